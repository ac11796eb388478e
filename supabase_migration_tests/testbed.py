"""Test-only pieces of the test bed: PgBouncer as Supabase's transaction pooler, the fixture
records, and `require` (skip locally, fail in CI)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg
import pytest

from supabase_migration.localpg import (
    LocalServer,
    find_binaries,
    free_port,
    hand_over,
    private_tempdir,
    service_command,
    service_env,
)


def cli_env(
    source_url: str, target_url: str, workdir: Path, dagster_home: Path | None = None, **extra: str
) -> dict[str, str]:
    """The environment a test runs `supabase-migrate` with: both URLs, and a manifest and a
    DAGSTER_HOME of its own (default `workdir/dagster_home`); `extra` adds or overrides."""
    env = {k: v for k, v in os.environ.items() if k != "SUPABASE_MIGRATION_REPORT_DIR"}
    env.update(
        {
            "SOURCE_DATABASE_URL": source_url,
            "SUPABASE_DB_URL": target_url,
            "DAGSTER_HOME": str(dagster_home or workdir / "dagster_home"),
            "SUPABASE_MIGRATION_MANIFEST": str(workdir / "migration.yaml"),
        }
    )
    env.update(extra)
    return env


# The target's `postgres` password: characters that break naive URL building, each of which
# must be percent-encoded (and '"' for PgBouncer's userlist).
TARGET_PASSWORD = "Sup@/pa%ss#word:1"


def require(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing; in CI (CI=true/1) a missing prerequisite fails."""
    if condition:
        return
    if os.environ.get("CI", "").strip().lower() in {"true", "1"}:
        pytest.fail(f"CI prerequisite missing: {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def database_on(major: int | str, name: str) -> Iterator[str]:
    """A database `name` on a throwaway server of an older PostgreSQL (see old_postgres) or,
    with "embedded", of the embedded build; its URL."""
    from . import old_postgres

    binaries = find_binaries("embedded") if major == "embedded" else old_postgres.binaries(major)
    require(
        binaries is not None,
        f"PostgreSQL {major} is not there: run `{old_postgres.FETCH_COMMAND}` (or `uv sync` "
        "for the embedded build).",
    )
    assert binaries is not None
    server = LocalServer(binaries, private_tempdir(f"smpg{major}-") / "data")
    try:
        server.init()
        server.start()
        server.create_database(name)
        yield server.url(dbname=name)
    finally:
        server.cleanup()


def find_pgbouncer() -> Path | None:
    """pgbouncer on PATH, or Debian's /usr/sbin (not on a non-root user's PATH)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    return Path(found) if found else None


@dataclass(frozen=True)
class SourceDb:
    """A fresh database on the source server; the superuser owns everything."""

    name: str
    url: str
    admin_url: str


@dataclass(frozen=True)
class TargetDb:
    """A fresh database on the Supabase-like target.

    `url` logs in as the non-superuser `postgres` over SSL, as users do; `admin_url` is
    supabase_admin over the unix socket, for fixtures and checks behind the tool's back.
    """

    name: str
    url: str
    admin_url: str
    password: str = field(repr=False)
    _pooler_url: str | None = field(default=None, repr=False)

    @property
    def pooler_url(self) -> str:
        """Through PgBouncer in transaction mode; skips (fails in CI) without pgbouncer."""
        require(self._pooler_url is not None, "pgbouncer is not installed (apt install pgbouncer)")
        assert self._pooler_url is not None
        return self._pooler_url


def _userlist_quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


class PgBouncer:
    """PgBouncer in transaction mode in front of a hostssl-only server, like Supavisor's 6543.

    The wildcard database entry forwards any database name, so per-test databases need no
    configuration. Clients must use SSL too (client_tls_sslmode=require).
    """

    def __init__(
        self,
        *,
        target_port: int,
        password: str,
        cert: Path | None,
        key: Path | None,
        user: str = "postgres",
        port: int | None = None,
        executable: Path | None = None,
        pool_mode: str = "transaction",
        ignore_startup_parameters: str = "extra_float_digits,options,statement_timeout",
    ) -> None:
        """`cert`/`key` None: no TLS on either side (in front of a plain source)."""
        found = executable or find_pgbouncer()
        if found is None:
            raise FileNotFoundError("pgbouncer is not installed")
        self.executable = found
        self.port = port or free_port()
        self.target_port = target_port
        self.user = user
        self.password = password
        self.directory = private_tempdir("smpgb-")
        self.log_path = self.directory / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_files(cert, key, pool_mode, ignore_startup_parameters)
        atexit.register(self.cleanup)

    def _write_files(
        self, cert: Path | None, key: Path | None, pool_mode: str, ignore: str
    ) -> None:
        """Config, userlist and a copy of the certificate the service user can read."""
        tls: dict[str, str] = {}
        files = []
        if cert is not None and key is not None:
            own_cert, own_key = self.directory / "server.crt", self.directory / "server.key"
            shutil.copyfile(cert, own_cert)
            shutil.copyfile(key, own_key)
            own_key.chmod(0o600)
            files = [own_cert, own_key]
            tls = {
                "client_tls_sslmode": "require",
                "client_tls_cert_file": str(own_cert),
                "client_tls_key_file": str(own_key),
                "server_tls_sslmode": "require",
            }
        userlist = self.directory / "userlist.txt"
        userlist.write_text(f"{_userlist_quote(self.user)} {_userlist_quote(self.password)}\n")
        userlist.chmod(0o600)
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "pool_mode": pool_mode,
            "max_client_conn": "200",
            "default_pool_size": "20",
            "auth_type": "scram-sha-256",
            "auth_file": str(userlist),
            # psycopg/SQLAlchemy send these; PgBouncer refuses unknown startup parameters.
            "ignore_startup_parameters": ignore,
            **tls,
            # Fault tests restart the server: reconnect quickly instead of after 15 s.
            "server_login_retry": "1",
        }
        ini = self.directory / "pgbouncer.ini"
        lines = ["[databases]", f"* = host=127.0.0.1 port={self.target_port}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        ini.write_text("\n".join(lines) + "\n")
        for path in (*files, userlist, ini):
            hand_over(path)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10) -> None:
        """Start in the foreground (as the service user when root) and wait for the port."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                service_command([self.executable, self.directory / "pgbouncer.ini"]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.directory,
                env=service_env(),
            )
        deadline = time.monotonic() + timeout
        while not self._accepts_connections():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM): clients are cut off, as in a pooler failure."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start on the same port: clients see their connections dropped."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        user = user or self.user
        password = self.password if password is None else password
        query = urlencode({"sslmode": "require"})
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@127.0.0.1:{self.port}/{quote(dbname, safe='')}?{query}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False


@contextlib.contextmanager
def round_trips(conn: psycopg.Connection, work: Path) -> Iterator[list[str]]:
    """What the client waited on the server for while the block ran, from libpq's protocol
    trace: each simple query ("Query"), extended-protocol Sync ("Sync") and end of COPY data
    ("CopyDone"). Filled in when the block ends."""
    with _traced(conn, work, "F", ("Query", "Sync", "CopyDone")) as waits:
        yield waits


@contextlib.contextmanager
def rows_received(conn: psycopg.Connection, work: Path) -> Iterator[list[str]]:
    """Each row the server sent while the block ran ("DataRow"), from libpq's protocol trace."""
    with _traced(conn, work, "B", ("DataRow",)) as rows:
        yield rows


@contextlib.contextmanager
def _traced(
    conn: psycopg.Connection, work: Path, sender: str, kinds: tuple[str, ...]
) -> Iterator[list[str]]:
    """The messages of `kinds` that `sender` ("F" the client, "B" the server) sent while the
    block ran; filled in when it ends."""
    seen: list[str] = []
    with open(work / f"trace-{conn.info.backend_pid}-{sender}", "w+b") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield seen
        finally:
            conn.pgconn.untrace()
            trace.seek(0)
            for line in trace.read().decode(errors="replace").splitlines():
                parts = line.split("\t")
                if parts[0] == sender and parts[2].strip() in kinds:
                    seen.append(parts[2].strip())


def within(seconds: float, work: Callable[[], object]) -> tuple[bool, float, list[BaseException]]:
    """Run `work` on a daemon thread for at most `seconds`: whether it ended, how long it
    took, and what it raised. A regression that hangs then fails its test, not the suite."""
    raised: list[BaseException] = []

    def call() -> None:
        try:
            work()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    began = time.monotonic()
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), time.monotonic() - began, raised


class GoingSilent:
    """A TCP relay to a server, until `go_silent`: from then on nothing is passed on either
    way, and new connections (a cancel request's) are accepted and never answered, as with
    a server behind a link that dropped.

    `deaf_after`: the next connection accepted stops being read once its client has sent that
    many bytes (it keeps its server connection open; the others pass on as before; `rearm`
    for another). With a small receive buffer the client's window shuts and what it sends
    waits, as when a peer vanishes in the middle of a COPY to it."""

    def __init__(self, port: int, *, deaf_after: int | None = None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        if deaf_after is not None:  # accepted sockets inherit it: no autotuning to megabytes
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.port = self._listener.getsockname()[1]
        self._server_port = port
        self._deaf_after = deaf_after
        self._armed = deaf_after is not None
        self.deafened = threading.Event()
        self._silent = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def go_silent(self) -> None:
        self._silent.set()

    def rearm(self) -> None:
        """Make the next connection accepted go deaf too (see `deaf_after`)."""
        self.deafened.clear()
        self._armed = True

    def close(self) -> None:
        """Every socket shut down, which wakes the relay's threads (a close alone does not
        end an accept() or recv() that another thread waits in), and they end."""
        self._closed.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            if self._silent.is_set():
                continue
            server = socket.create_connection(("127.0.0.1", self._server_port))
            self._sockets.append(server)
            deaf_after, self._armed = (self._deaf_after if self._armed else None), False
            for a, b, limit in ((client, server, deaf_after), (server, client, None)):
                self._threads.append(
                    threading.Thread(target=self._pass, args=(a, b, limit), daemon=True)
                )
                self._threads[-1].start()

    def _pass(self, source: socket.socket, sink: socket.socket, deaf_after: int | None) -> None:
        passed = 0
        try:
            while data := source.recv(65536):
                passed += len(data)
                if deaf_after is not None and passed > deaf_after:
                    self.deafened.set()
                    self._closed.wait()  # reads nothing more from this client until closed
                    return
                if not self._silent.is_set():
                    sink.sendall(data)
        except OSError:
            return
