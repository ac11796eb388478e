"""Opening connections, explaining why they fail, and retrying what is worth retrying.

The tool's psycopg connections open through `connect` (SQLAlchemy's, for Alembic and an
application after cut-over, through `make_engine` with the same settings), so every one of them
is named `supabase-migration` in pg_stat_activity, never uses server-side prepared statements
(PgBouncer/Supavisor in transaction mode on port 6543 cannot keep them), and fails with one
sentence that names the endpoint and what to do, never with libpq's raw text (which may quote
the connection string) and never with the password.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import multiprocessing.util
import os
import random
import re
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import AbstractContextManager
from queue import Queue
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import pq, sql

from .conninfo import DatabaseUrl, Endpoint
from .errors import ConfigError, ConnectionFailed, MigrationError, TransientError
from .redaction import describe_pg_error, redact_text

if TYPE_CHECKING:
    import sqlalchemy
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")
Item = TypeVar("Item")
Result = TypeVar("Result")
Conn = TypeVar("Conn")  # a connection, or a (source, target) pair of them

# SQLSTATEs after which the same work can simply be tried again.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, shutting down, recovery)
        "53300",  # too_many_connections
        "08000",  # connection_exception
        "08001",  # sqlclient_unable_to_establish_sqlconnection
        "08003",  # connection_does_not_exist
        "08006",  # connection_failure
        "08007",  # transaction_resolution_unknown
        "25P03",  # idle_in_transaction_session_timeout
    }
)

# Words of libpq, PgBouncer and Supavisor for a lost connection or a momentarily full pool.
_TRANSIENT_TEXT = re.compile(
    "|".join(
        [
            r"server closed the connection unexpectedly",
            r"server conn(ection)? (closed|crashed)",  # PgBouncer, when its server backend died
            r"terminating connection",
            r"connection reset",
            r"broken pipe",
            r"ssl syscall error",
            r"ssl connection has been closed unexpectedly",
            r"eof detected",
            r"unexpected eof",  # OpenSSL 3: the peer's TCP connection ended without TLS's close
            r"could not receive data from server",
            r"could not send data to server",
            r"consuming input failed",
            r"the connection is (?:closed|lost)",
            r"server conn crashed",
            r"no more connections allowed",
            r"max_client_conn",
            r"query_wait_timeout",
            r"maxclientsinsessionmode",
            r"max client connections reached",
            r"too many clients",
            r"too many connections",
            r"remaining connection slots are reserved",
            r"the database system is (?:starting up|shutting down|in recovery mode"
            r"|not yet accepting connections|not accepting connections)",
            r"pgbouncer cannot connect to server",
            r"server login has been failing",
            r"client_login_timeout",
            r"pooler is shutting down",
        ]
    ),
    re.IGNORECASE,
)


_POOLERS = frozenset({Endpoint.SESSION_POOLER, Endpoint.TRANSACTION_POOLER})


class ServerUnreachable(ConnectionFailed):
    """Refused or timed out: permanent for one attempt, retried inside `retrying`.

    A first connection that is refused almost always means a wrong host or port, so `connect`
    fails at once; during a migration the same symptom usually means a restart, so the
    `retrying` loop waits and tries again.
    """


# SQLSTATE classes that mean the set-up is wrong rather than the run: authorization, access
# rules (a privilege, a missing table or column), catalog and schema names. Bad input, exit 2.
_SETUP_CLASSES = ("28", "42", "3D", "3F")


def database_error_exit_code(exc: psycopg.Error) -> int:
    """The exit code for a database error no step translated: 2 for a set-up to fix, else 1
    (a syntax error, 42601, is the tool's own)."""
    sqlstate = exc.sqlstate or ""
    if is_transient(exc) or sqlstate == "42601":
        return 1
    return 2 if sqlstate[:2] in _SETUP_CLASSES else 1


def database_error(
    exc: psycopg.Error, sentence: str, otherwise: type[MigrationError] = MigrationError
) -> MigrationError:
    """`sentence` (already PHI-free) as the error a database error amounts to: worth retrying,
    a set-up to fix (exit 2, as `database_error_exit_code` says), or `otherwise`."""
    if is_transient(exc):
        return TransientError(sentence)
    if database_error_exit_code(exc) == ConfigError.exit_code:
        return ConfigError(sentence)
    return otherwise(sentence)


def is_transient(exc: BaseException) -> bool:
    """True when the same work may succeed if simply tried again."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, MigrationError):
        return False
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate in TRANSIENT_SQLSTATES:
        return True
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
        sqlstate and sqlstate.startswith("08")
    ):
        # PgBouncer reports everything (also permanent problems) as 08P01: go by the words.
        return bool(_TRANSIENT_TEXT.search(str(exc)))
    return False


class KeyValue(sql.Literal):
    """A key value of a table keyed by a unique column in a statement (a range bound): sent
    as a bound parameter, never in the statement's text. pgaudit's object logging, which the
    security step turns on for the target's tables, and `log_statement` write statement text
    to the server log, and such a key may be PHI (an SSN); primary keys name rows everywhere
    (`TableInfo.rows_named`) and stay inline, saving round trips. COPY cannot take
    parameters: there it stays a literal (only on the source, which we do not audit)."""

    def __init__(self, value: str | None) -> None:
        super().__init__(value)
        self.value = value


def _leaves(query: sql.Composable) -> Iterator[sql.Composable]:
    if isinstance(query, sql.Composed):
        for part in query:
            yield from _leaves(part)
    else:
        yield query


def has_key_values(query: sql.Composable) -> bool:
    return any(isinstance(leaf, KeyValue) for leaf in _leaves(query))


def _with_key_values_bound(
    query: sql.Composable, context: psycopg.Cursor[Any]
) -> tuple[bytes, list[str | None]] | None:
    """`query`'s text with a `%s` for each KeyValue, and their values; None without any.

    The statement had no parameters of its own, so every `%` elsewhere in it (an identifier,
    a LIKE pattern) is a literal one, escaped as the parameters now require."""
    if not has_key_values(query):
        return None
    text: list[bytes] = []
    values: list[str | None] = []
    for leaf in _leaves(query):
        if isinstance(leaf, KeyValue):
            text.append(b"%s")
            values.append(leaf.value)
        else:
            text.append(leaf.as_bytes(context).replace(b"%", b"%%"))
    return b"".join(text), values


class KeyBindingCursor(psycopg.Cursor[Any]):
    """The cursor of every connection of ours: a statement's KeyValues go as parameters."""

    def execute(  # type: ignore[override]
        self, query: Any, params: Any = None, **kwargs: Any
    ) -> KeyBindingCursor:
        if params is None and isinstance(query, sql.Composed):
            bound = _with_key_values_bound(query, self)
            if bound is not None:
                query, params = bound
        elif isinstance(query, sql.Composed) and has_key_values(query):
            raise TypeError("a statement with KeyValues cannot take parameters of its own")
        return super().execute(query, params, **kwargs)


def connect(
    url: DatabaseUrl, *, autocommit: bool = False, connect_timeout: int = 10
) -> psycopg.Connection:
    """Open a connection, or raise ConnectionFailed/TransientError with one clear sentence."""
    try:
        return psycopg.Connection.connect(
            url.conninfo(),
            autocommit=autocommit,
            cursor_factory=KeyBindingCursor,
            **_connect_args(url, connect_timeout),
        )
    except psycopg.OperationalError as exc:
        raise connection_error(url, exc, connect_timeout=connect_timeout) from None


# Idle connections kept per database and login for the process's next table run or asset:
# a CopySession holds two on the source (rows, checksums) and one on the target.
KEPT_PER_DATABASE = 2


class _Kept:
    """This process's idle connections, keyed by a sha256 of their conninfo, so that the key
    (which a debugger or a repr could show) never holds the password in clear."""

    lock = threading.Lock()
    idle: dict[str, list[psycopg.Connection]] = {}
    owner_pid: int | None = None  # the process whose exit closes them
    # A forked child's copies of its parent's connections: closing one would end the parent's
    # session (libpq sends Terminate on the shared socket), so they are never used or closed.
    inherited: list[psycopg.Connection] = []


def _kept_key(url: DatabaseUrl) -> str:
    return hashlib.sha256(url.conninfo().encode()).hexdigest()


def reused(url: DatabaseUrl, *, connect_timeout: int = 10) -> psycopg.Connection:
    """An idle autocommit connection this process kept for `url` (see `keep`), else a new one.

    A Supabase target is tens of milliseconds away, and a new connection costs about five
    round trips (TCP, TLS, SCRAM): a worker running table after table keeps its connections.
    Everything the tool sets is transaction-local, so a kept session carries nothing over. A
    kept connection that its server ended (a restart, pg_terminate_backend) has something to
    read on its socket and is replaced here, without a round trip; one lost silently fails on
    first use, where callers retry.
    """
    key = _kept_key(url)
    with _Kept.lock:
        idle = _Kept.idle.get(key, [])
        while idle:
            conn = idle.pop()
            if _idle_and_alive(conn):
                return conn
            conn.close()
    return connect(url, autocommit=True, connect_timeout=connect_timeout)


def keep(url: DatabaseUrl, conn: psycopg.Connection) -> None:
    """Give `conn` back for `reused`; closed instead when it is not idle in autocommit, or
    KEPT_PER_DATABASE are kept already. Kept connections are closed when the process exits."""
    key = _kept_key(url)
    with _Kept.lock:
        idle = _Kept.idle.setdefault(key, [])
        if conn.autocommit and len(idle) < KEPT_PER_DATABASE and _idle_and_alive(conn):
            idle.append(conn)
            _close_kept_at_exit()
            return
    conn.close()


@contextlib.contextmanager
def borrowed(url: DatabaseUrl, *, connect_timeout: int = 10) -> Iterator[psycopg.Connection]:
    """An autocommit connection from `reused`, given back to `keep` when the block ends."""
    conn = reused(url, connect_timeout=connect_timeout)
    try:
        yield conn
    finally:
        keep(url, conn)


def close_kept() -> None:
    """Close every kept connection (at exit, and in tests that stop their servers)."""
    with _Kept.lock:
        conns = [conn for idle in _Kept.idle.values() for conn in idle]
        _Kept.idle.clear()
    for conn in conns:
        conn.close()


def _idle_and_alive(conn: psycopg.Connection) -> bool:
    if conn.closed or conn.broken:
        return False
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        return False
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return not readable  # an idle session has nothing to say but its own end


def _close_kept_at_exit() -> None:
    """Once per process: atexit for the CLI, a multiprocessing finalizer for its workers
    (which leave through os._exit, skipping atexit)."""
    if _Kept.owner_pid != os.getpid():
        _Kept.owner_pid = os.getpid()
        atexit.register(close_kept)
        multiprocessing.util.Finalize(None, close_kept, exitpriority=0)


def _forget_inherited() -> None:
    _Kept.lock = threading.Lock()
    _Kept.inherited += [conn for idle in _Kept.idle.values() for conn in idle]
    _Kept.idle = {}


os.register_at_fork(after_in_child=_forget_inherited)


_facts: weakref.WeakKeyDictionary[psycopg.Connection, dict[str, Any]] = weakref.WeakKeyDictionary()


def remembered(conn: psycopg.Connection, fact: str, read: Callable[[psycopg.Connection], T]) -> T:
    """`read(conn)`, asked once per connection: for what cannot change while a session lasts
    (its database's collation, what its role may set), which every table run on a kept
    connection would otherwise ask again, a round trip or two each time."""
    known = _facts.setdefault(conn, {})
    if fact not in known:
        known[fact] = read(conn)
    return known[fact]


def connection_error(
    url: DatabaseUrl, exc: BaseException, *, connect_timeout: int = 10
) -> ConnectionFailed | TransientError:
    """Map a connect-time failure to the exception to raise, with one sentence per cause."""
    raw = str(exc)
    text = raw.lower()
    where = f"Could not connect to the {url.describe()}"

    def fail(reason: str, cls: type[ConnectionFailed] = ConnectionFailed) -> ConnectionFailed:
        return cls(redact_text(f"{where}: {reason}.", _secrets(url)))

    if isinstance(exc, psycopg.errors.ConnectionTimeout) or "timeout expired" in text:
        return fail(
            f"no answer within {connect_timeout} s; check the host and port, and that firewalls "
            "or the project's network restrictions allow this machine",
            ServerUnreachable,
        )
    if _TRANSIENT_TEXT.search(raw) and "password" not in text:
        return TransientError(
            redact_text(f"{where}: {_transient_reason(text)}; try again shortly.", _secrets(url))
        )
    if re.search(
        r"failed to resolve host|could not translate host name|name or service not known"
        r"|nodename nor servname|no address associated|temporary failure in name resolution",
        text,
    ):
        hint = (
            "check the region in the pooler host name (copy it from the dashboard's Connect panel)"
            if url.is_supabase and url.endpoint in _POOLERS
            else "check the host name in the URL"
        )
        return fail(f"the host name {url.host} does not resolve; {hint}")
    ipv6_hint = _ipv6_hint(url)
    if re.search(r"network is unreachable|cannot assign requested address|no route to host", text):
        if ipv6_hint:
            return fail(f"this machine has no route to {url.host}; {ipv6_hint}")
        return fail(f"this machine has no network route to {url.host}", ServerUnreachable)
    if "connection refused" in text:
        if ipv6_hint:
            return fail(f"the connection was refused; {ipv6_hint}", ServerUnreachable)
        return fail(
            f"the connection was refused; check that the server is running and listening on "
            f"port {url.port} of {url.host}",
            ServerUnreachable,
        )
    if "tenant or user not found" in text:
        return fail(
            f"the pooler does not know user {url.user}; the pooler user is "
            "postgres.<project-ref> and the pooler host must be the one in this project's "
            "Connect panel"
        )
    if "authentication failed" in text:  # password / SASL / scram, libpq or a pooler
        hint = "check the password"
        if url.is_supabase:
            hint += " (reset it in the dashboard's Database Settings if needed)"
            if url.endpoint in _POOLERS:
                hint += " and that the pooler user is postgres.<project-ref>"
        return fail(f"password authentication failed for user {url.user}; {hint}")
    if "no password supplied" in text or "password is required" in text:
        passfile = url.params.get("passfile") or os.environ.get("PGPASSFILE")
        if passfile:  # libpq says the same whether the file is missing or has no line for it
            return fail(
                f"the server asks for a password, which neither the URL nor the passfile "
                f"{passfile} gives (a file that is missing or unreadable, or without a line "
                "for this host, port, database and user); add it to either"
            )
        return fail("the server asks for a password and the URL has none; add it to the URL")
    if re.search(r'database "[^"]*" does not exist', text) or "no such database" in text:
        supabase = (
            " (on Supabase it is postgres)" if url.is_supabase or url.label == "target" else ""
        )
        return fail(
            f"database {url.dbname} does not exist; check the database name at the end of the "
            f"URL{supabase}"
        )
    if "invalid response to ssl negotiation" in text or "expected authentication request" in text:
        return fail(
            f"port {url.port} does not answer as PostgreSQL does; check the port (Supabase: 5432 "
            "direct or session pooler, 6543 transaction pooler)"
        )
    if re.search(r'role "[^"]*" does not exist', text):
        return fail(f"user {url.user} does not exist on that server; check the user in the URL")
    if "server does not support ssl" in text:
        if url.is_loopback:
            advice = "enable SSL on the server, or for this local server drop sslmode from the URL"
        else:
            advice = "enable SSL on the server; the tool does not send data unencrypted"
        return fail(f"the server does not support SSL but the URL requires it; {advice}")
    if "pg_hba.conf" in text and "no encryption" in text:
        return fail(
            "the server accepts only encrypted connections from here; use sslmode=require "
            "(the default for remote hosts) or verify-full"
        )
    if "pg_hba.conf" in text:
        return fail(
            f"the server's pg_hba.conf does not let user {url.user} connect to database "
            f"{url.dbname} from this machine; ask its administrator, or on Supabase check the "
            "network restrictions"
        )
    if "does not match host name" in text:
        return fail(
            f"the server certificate does not name host {url.host} (sslmode=verify-full); "
            "connect with the host name shown in the dashboard rather than an IP address"
        )
    if re.search(r"certificate verify failed|root certificate file|certificate", text):
        return fail(
            "the server certificate could not be verified; pass the Supabase CA certificate "
            "(prod-ca-2021.crt from the dashboard's Database Settings) with sslrootcert="
        )
    return fail(_short_reason(raw, url))


def _transient_reason(text: str) -> str:
    if "starting up" in text or "recovery mode" in text or "not yet accepting" in text:
        return "the server is starting up"
    if "shutting down" in text:
        return "the server is shutting down"
    if "maxclientsinsessionmode" in text or "max client connections reached" in text:
        return "the session pooler is full (its pool size caps clients); lower --workers"
    if "too many" in text or "no more connections" in text or "slots are reserved" in text:
        return "the server or pooler has no free connection slots"
    return (
        "the server closed the connection while it was being set up (a restart, or the port "
        "is not PostgreSQL or a pooler)"
    )


def _ipv6_hint(url: DatabaseUrl) -> str | None:
    """Supabase's direct host is IPv6-only without the IPv4 add-on: say so and name the fix."""
    if url.endpoint is not Endpoint.DIRECT or not url.is_supabase:
        return None
    return (
        f"db.{url.project_ref}.supabase.co is IPv6-only unless the project has the IPv4 add-on, "
        "so from an IPv4-only network use the session pooler (the dashboard's Connect panel: "
        f"<region>.pooler.supabase.com port 5432, user postgres.{url.project_ref})"
    )


def _short_reason(raw: str, url: DatabaseUrl) -> str:
    """libpq's last meaningful line, redacted and squeezed into one clause."""
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    reason = lines[0] if lines else "unknown error"
    reason = re.sub(r"^(?:connection failed: )?", "", reason)
    reason = re.sub(r"^connection to server (?:at|on) .*? failed: ", "", reason)
    reason = re.sub(r"^(?:FATAL|ERROR):\s+", "", reason)
    reason = redact_text(reason, _secrets(url)).rstrip(". ")
    return reason.replace(". ", "; ") or "unknown error"


def _secrets(url: DatabaseUrl) -> list[str]:
    return [s for s in (url.password, url.params.get("sslpassword")) if s]


def retrying(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    what: str = "operation",
    log: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn`, retrying transient failures with bounded exponential backoff and jitter.

    Permanent errors propagate at once, unchanged. When every attempt failed, a transient
    psycopg error becomes a TransientError naming `what`; a MigrationError is re-raised.
    """
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            retryable = is_transient(exc) or isinstance(exc, ServerUnreachable)
            if not retryable:
                raise
            if attempt == attempts:
                if isinstance(exc, MigrationError):
                    raise
                raise TransientError(
                    f"{_capitalized(what)} still failed after {attempts} attempts: "
                    f"{describe_pg_error(exc)}."
                ) from None
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            delay = random.uniform(delay / 2, delay)
            if log is not None:
                log(
                    f"{_capitalized(what)} hit a transient error ({describe_pg_error(exc)}); "
                    f"retrying in {delay:.1f} s (attempt {attempt + 1} of {attempts})."
                )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def warn_if_workers_exceed_pool(url: DatabaseUrl, workers: int, pool_size: int = 15) -> str | None:
    """Supavisor session mode admits at most pool-size clients per user+database; a run holds
    one target connection per worker and one in its main process (the progress and the
    steps around the copy)."""
    if url.endpoint is Endpoint.SESSION_POOLER and workers + 1 > pool_size:
        return (
            f"--workers {workers} and the run's own connection exceed the session pooler's "
            f"pool size ({pool_size}): Supavisor session mode admits at most that many clients "
            "per user and database, so the extra workers wait and then fail with "
            f"MaxClientsInSessionMode; use --workers {pool_size - 1} or fewer, raise the pool "
            "size, or use the direct host."
        )
    return None


# A peer that vanished (a dropped link, a dead host) is noticed within a minute while a query
# waits on it, instead of after the kernel's two idle hours, and the range is retried. The
# server's kernel answers keepalives however long its query runs, so a long query is never
# taken for a dead peer. Keepalives are not sent while data we sent is unacknowledged (a COPY
# to the target): there TCP_USER_TIMEOUT closes the connection once data has waited a minute
# unacknowledged, or the peer's window has stayed shut that long, instead of after about 15
# minutes of the kernel's retransmissions. Settings in the user's URL win.
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",  # milliseconds; it also bounds the keepalives, to the same minute
}


def _keepalive_args(params: Mapping[str, str]) -> dict[str, str]:
    """KEEPALIVES under the URL's own settings. The kernel lets tcp_user_timeout decide when
    unanswered keepalives end a connection, so when the URL tunes keepalives and not it, it
    becomes their idle time plus all their probes: the URL's keepalives keep their meaning."""
    args = {key: value for key, value in KEEPALIVES.items() if key not in params}
    if "tcp_user_timeout" in args and any(k.startswith("keepalives_") for k in params):
        merged = {**KEEPALIVES, **params}
        try:
            seconds = int(merged["keepalives_idle"]) + int(merged["keepalives_interval"]) * int(
                merged["keepalives_count"]
            )
        except ValueError:  # libpq refuses the URL with its own words
            return args
        args["tcp_user_timeout"] = str(seconds * 1000)
    return args


def _connect_args(url: DatabaseUrl, connect_timeout: int) -> dict[str, Any]:
    """What every connection of ours is opened with, beside the URL's own parameters."""
    return {
        "application_name": url.application_name,
        "connect_timeout": connect_timeout,
        # No server-side prepared statements, ever: a transaction pooler cannot always be told
        # from its address (a self-hosted PgBouncer looks like a server), and our few large
        # statements gain nothing from preparation.
        "prepare_threshold": None,
        # Rows pass from one server to the other through us: their text must leave the source
        # in the encoding the target reads it in, whatever either database is encoded in (a
        # LATIN1 source sent LATIN1 bytes that a UTF8 target refused). The servers convert.
        "client_encoding": "UTF8",
        **_keepalive_args(url.params),
    }


def make_engine(
    url: DatabaseUrl,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    connect_timeout: int = 10,
    pool_pre_ping: bool = True,
) -> sqlalchemy.Engine:
    """A SQLAlchemy engine on psycopg; bound parameters (row values) stay out of its errors.

    SQLAlchemy is imported here, not at the top: `verify` and `status` never need it, and it
    costs them 0.3-0.4 s of start-up.
    """
    import sqlalchemy

    return sqlalchemy.create_engine(
        url.sqlalchemy_url(),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=pool_pre_ping,
        hide_parameters=True,
        connect_args=_connect_args(url, connect_timeout),
    )


def make_async_engine(
    url: DatabaseUrl,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    connect_timeout: int = 10,
    pool_pre_ping: bool = True,
) -> AsyncEngine:
    """The engine an application uses after cut-over, also through the Supabase pooler.

    Prepared statements are off, as Supabase's transaction pooler (port 6543) requires; SET
    must become SET LOCAL inside each transaction there. Example::

        url = parse_database_url(os.environ["SUPABASE_POOLER_URL"], label="app")
        engine = make_async_engine(url, pool_size=10)
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT 1"))).all()
        await engine.dispose()

    Needs greenlet (`sqlalchemy[asyncio]`), so it is imported only here.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine(
        url.async_sqlalchemy_url(),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=pool_pre_ping,
        hide_parameters=True,
        connect_args=_connect_args(url, connect_timeout),
    )


def side_by_side(
    open_conn: Callable[[], AbstractContextManager[Conn]],
    items: Sequence[Item],
    work: Callable[[Conn, Item], Result],
    *,
    what: Callable[[Item], str],
    connections: int = 2,
) -> list[Result]:
    """`work(conn, item)` for every item, `connections` items at a time, each on a connection
    of its own (opened once, then reused); results in the order of `items`.

    Independent whole-table reads (plans, catch-up checks) then overlap instead of queueing on
    one connection: the servers have cores to spare while one query runs. A database error
    becomes one sentence, `what(item)` + " failed: " + the error without values: a missing
    privilege is the user's to fix (exit code 2), a lost connection is worth a retry.
    """
    if not items:
        return []
    with contextlib.ExitStack() as stack:
        idle: Queue[Conn] = Queue()
        for _ in range(min(connections, len(items))):
            idle.put(stack.enter_context(open_conn()))

        def one(item: Item) -> Result:
            conn = idle.get()
            try:
                return work(conn, item)
            except psycopg.Error as exc:
                cls: type[MigrationError] = MigrationError
                if isinstance(exc, psycopg.errors.InsufficientPrivilege):
                    cls = ConfigError
                elif is_transient(exc):
                    cls = TransientError
                raise cls(f"{what(item)} failed: {describe_pg_error(exc)}.") from None
            finally:
                idle.put(conn)

        opened = list(_each(list(idle.queue)))
        with ThreadPoolExecutor(idle.qsize()) as pool:
            return gather_or_stop([pool.submit(one, item) for item in items], lambda: opened)


def _each(opened: Sequence[object]) -> Iterator[psycopg.Connection]:
    """The connections among what `open_conn` gave: one connection, or a tuple of them."""
    for item in opened:
        for conn in item if isinstance(item, tuple) else (item,):
            if isinstance(conn, psycopg.Connection):
                yield conn


CANCEL_TIMEOUT_S = 2.0
STOP_WAIT_S = 10.0  # how long a stopping command keeps cancelling its threads' queries
SEVERED_WAIT_S = 2.0  # and then waits for threads whose connections it cut


def gather_or_stop(
    futures: Sequence[Future[Result]],
    connections: Callable[[], Sequence[psycopg.Connection]],
    on_stop: Callable[[], object] = lambda: None,
) -> list[Result]:
    """Every future's result, in order; or, at the first error or Ctrl-C, the error, once
    the other threads have stopped.

    Their queries (on `connections`) are cancelled until the threads end instead of being
    waited for: a whole-table read of a big table takes minutes, one behind a lock forever.
    The connections are then closed, not kept for reuse: a cancel that arrives late would
    otherwise stop someone else's next statement (a pooler forwards cancels on its own time).
    `on_stop` runs first (to tell the threads to start nothing new).
    """
    try:
        futures_wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            failed = None if future.cancelled() or not future.done() else future.exception()
            if failed is not None:
                raise failed
        return [future.result() for future in futures]
    except BaseException:
        on_stop()
        for future in futures:
            future.cancel()  # the work not started
        if stop_queries(lambda t: not futures_wait(futures, timeout=t).not_done, connections):
            for conn in connections():
                conn.close()  # no thread uses them any more
        raise


def cancel_query(conn: psycopg.Connection) -> None:
    """Cancel the query another thread runs on `conn` now, if any (the request travels on a
    connection of its own; an idle connection ignores it)."""
    if not conn.closed:
        with contextlib.suppress(psycopg.Error):
            conn.cancel_safe(timeout=CANCEL_TIMEOUT_S)


def stop_queries(
    done: Callable[[float], bool],
    connections: Callable[[], Sequence[psycopg.Connection]],
    sever_all: Callable[[], object] | None = None,
) -> bool:
    """Cancel the connections' queries every few tenths of a second until `done(timeout)`
    says the threads using them have ended (a cancel reaches only the query running when it
    arrives; a thread may start its next one just after).

    A server that stopped answering (a dropped link, a frozen host) ignores cancels as well,
    and a thread waiting on it would wait until TCP gives up: minutes to hours. After
    STOP_WAIT_S the connections are cut instead, which ends those waits with an error at
    once (`sever_all`, where the threads close connections themselves: under their lock).
    False if some thread outlived even that."""
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        for conn in connections():
            if time.monotonic() >= deadline:
                break
            cancel_query(conn)
        if done(0.2):
            return True
    if sever_all is not None:
        sever_all()
    else:
        for conn in connections():
            sever(conn)
    return done(SEVERED_WAIT_S)


def sever(conn: psycopg.Connection) -> None:
    """Shut the connection's socket down under the thread that waits on it: its read or
    write fails at once. The connection itself is left for its own thread to close (libpq's
    state is not to be freed under another thread)."""
    with contextlib.suppress(OSError, psycopg.Error):
        fd = os.dup(conn.pgconn.socket)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise
        with sock:
            sock.shutdown(socket.SHUT_RDWR)


def in_one_round_trip(
    conn: psycopg.Connection,
    statements: Sequence[sql.Composable],
    rowcounts: list[int] | None = None,
) -> list[tuple]:
    """Run `statements` in one round trip (one simple query: no parameters, values inline);
    the first row of each that returns rows, in order. `rowcounts`, if given, gets each
    statement's row count (-1 where it has none).

    A Supabase target is tens of milliseconds away: statements that always go together
    travel together (a range's BEGIN with its lock and settings, its COMMIT with the
    checkpoint's update; a verification snapshot's BEGIN with its settings). The server stops
    at the first error; a transaction begun here then waits for a ROLLBACK. A statement with
    KeyValues takes a round trip of its own (parameters go one statement at a time), so
    such statements belong in a transaction with the others.
    """
    rows: list[tuple] = []
    with conn.cursor() as cur:
        for batch in _batches(statements):
            cur.execute(batch)
            while True:
                if rowcounts is not None:
                    rowcounts.append(cur.rowcount)
                if cur.description is not None:
                    rows.append(cur.fetchone())
                if not cur.nextset():
                    break
    return rows


def _batches(statements: Sequence[sql.Composable]) -> Iterator[sql.Composable]:
    """Runs of statements without KeyValues, joined; each statement with some, alone."""
    plain: list[sql.Composable] = []
    for statement in statements:
        if has_key_values(statement):
            if plain:
                yield sql.SQL("; ").join(plain)
                plain = []
            yield sql.Composed([statement])
        else:
            plain.append(statement)
    if plain:
        yield sql.SQL("; ").join(plain)


@contextlib.contextmanager
def rolled_back_on_error(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction begun with `in_one_round_trip` is rolled back on any error (best effort:
    a lost connection rolls it back on the server anyway). The connection is autocommit."""
    try:
        yield
    except BaseException:
        if not conn.closed and conn.info.transaction_status != pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def transaction_with(
    conn: psycopg.Connection, first: Sequence[sql.Composable], *, commit: bool = True
) -> Iterator[list[tuple]]:
    """A transaction whose `first` statements travel with its BEGIN (their first rows, as
    `in_one_round_trip`), then COMMIT, or ROLLBACK with `commit=False`; any error rolls it
    back. On a connection that is not autocommit psycopg begins it, and `first` takes a round
    trip of its own."""
    if not conn.autocommit:
        with conn.transaction(force_rollback=not commit):
            yield in_one_round_trip(conn, first)
        return
    with rolled_back_on_error(conn):
        yield in_one_round_trip(conn, [sql.SQL("BEGIN"), *first])
        conn.execute("COMMIT" if commit else "ROLLBACK")
