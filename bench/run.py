"""Benchmark: our migration against pg_dump | psql, pg_dump -Fc + pg_restore -j, and pgcopydb.

    uv run python bench/run.py [--rows 3000000] [--workers 2] [--out bench/results]
    uv run python bench/run.py --sweep [--sweep-rows 500000]

Starts two throwaway PostgreSQL clusters from the system binaries (a plain source and a
Supabase-like target: SSL only, non-superuser `postgres` with a password), fills the source
with the example clinic app, then times every contender into a fresh, empty target database.
Each contender runs in its own helper process, so its wall time covers the whole command
(interpreter start-up included) and `getrusage(RUSAGE_CHILDREN).ru_maxrss` is the peak RSS of
its largest single process; the sum over the process tree is sampled from /proc as well.
Server processes are not counted: they belong to the postmaster, not to the contender.

See bench/README.md for what each row means, and docs/benchmark.md for the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
SOURCE_DB = "clinic"
TARGET_PASSWORD_BYTES = 18
MB = 1024 * 1024

# Same for every contender. fsync stays off (localpg's FAST_SETTINGS), as on a throwaway
# server; the larger WAL budget keeps checkpoints from firing in the middle of one contender.
SERVER_SETTINGS = {
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    "shared_buffers": "256MB",
    "maintenance_work_mem": "256MB",
    "max_connections": "100",
}


# --------------------------------------------------------------------------------------------
# The measuring helper: runs a contender's steps in a fresh process so that RUSAGE_CHILDREN
# only sees that contender's processes.


def measure_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    env = {**os.environ, **spec["env"]}
    for key in spec.get("unset", []):
        env.pop(key, None)
    steps_out = []
    ok = True
    started = time.monotonic()
    for step in spec["steps"]:
        log_path = Path(spec["log_dir"]) / f"{step['name']}.log"
        argv = ["bash", "-o", "pipefail", "-c", step["shell"]] if "shell" in step else step["argv"]
        t0 = time.monotonic()
        with log_path.open("wb") as log:
            done = subprocess.run(
                argv,
                env=env,
                cwd=spec["cwd"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        wall = time.monotonic() - t0
        rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        steps_out.append(
            {
                "name": step["name"],
                "returncode": done.returncode,
                "wall_s": wall,
                "max_rss_kb_so_far": rss_kb,
                "log": str(log_path),
            }
        )
        if done.returncode not in step.get("ok_codes", [0]):
            ok = False
            break
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "ok": ok,
        "wall_s": time.monotonic() - started,
        "max_rss_kb": usage.ru_maxrss,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "steps": steps_out,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _tree_rss_bytes(root: int) -> int:
    children = _children_map()
    total, stack, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


# Data directories of the clusters whose CPU time `measure` reports. Set by `servers`.
SERVER_PGDATA: list[Path] = []


def _cpu_ticks(pid: int, *, waited: bool) -> int:
    """utime + stime of a process, plus cutime + cstime (its waited-for children) if asked."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rfind(")") + 2 :].split()  # fields[0] is field 3 (state)
    ticks = int(fields[11]) + int(fields[12])
    if waited:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def server_cpu() -> float:
    """CPU seconds used so far by the clusters: each postmaster, the backends it has reaped
    (cutime/cstime) and the ones still running. A delta around a contender is what the
    servers spent on it (plus background work such as autovacuum)."""
    total = 0
    children = _children_map()
    for pgdata in SERVER_PGDATA:
        try:
            postmaster = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            continue
        total += _cpu_ticks(postmaster, waited=True)
        for child in children.get(postmaster, []):
            total += _cpu_ticks(child, waited=True)
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    ok: bool
    wall_s: float
    max_rss_mb: float  # the largest single process of the contender (exact, from rusage)
    tree_rss_mb: float  # the whole process tree at its largest (sampled every 0.2 s)
    steps: list[dict[str, Any]]
    error: str | None = None
    cpu_s: float = 0.0  # user + system CPU of the contender's processes
    server_cpu_s: float = 0.0  # user + system CPU of both PostgreSQL clusters meanwhile


# Where contenders' Python bytecode goes (None: leave the environment as it is). Set by main.
PYCACHE: Path | None = None


def python_env() -> tuple[dict[str, str], list[str]]:
    """Environment for a Python contender: compiled bytecode cached in PYCACHE.

    Without it, a process started under PYTHONDONTWRITEBYTECODE=1 in a virtualenv installed
    without .pyc files compiles Dagster from source on every start, which costs each process
    (the CLI and every spawned worker) several seconds; an installed tool does not pay that.
    """
    if PYCACHE is None:
        return {}, []
    return {"PYTHONPYCACHEPREFIX": str(PYCACHE)}, ["PYTHONDONTWRITEBYTECODE"]


def measure(
    name: str,
    steps: Sequence[dict[str, Any]],
    *,
    env: dict[str, str],
    cwd: Path,
    work: Path,
) -> Measured:
    """Run `steps` one after another in a helper process; wall time, peak RSS, exit codes."""
    extra, unset = python_env()
    env = {**extra, **env}
    log_dir = work / "logs" / name
    serial = 1
    while log_dir.exists():  # a repeat: keep the earlier run's logs
        serial += 1
        log_dir = work / "logs" / f"{name}.{serial}"
    log_dir.mkdir(parents=True)
    spec_path = log_dir / "spec.json"
    result_path = log_dir / "result.json"
    spec = {
        "steps": list(steps),
        "env": env,
        "unset": list(unset),
        "cwd": str(cwd),
        "log_dir": str(log_dir),
        "result": str(result_path),
    }
    spec_path.write_text(json.dumps(spec))
    server_before = server_cpu()
    helper = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--measure-helper", str(spec_path)],
        start_new_session=True,  # its own process group: we can stop the whole tree
    )
    peak = 0
    try:
        while helper.poll() is None:
            peak = max(peak, _tree_rss_bytes(helper.pid))
            time.sleep(0.2)
    except BaseException:
        _kill_group(helper)
        raise
    if not result_path.exists():
        return Measured(False, 0.0, 0.0, peak / MB, [], error="the helper process died")
    result = json.loads(result_path.read_text())
    error = None
    if not result["ok"]:
        last = result["steps"][-1]
        tail = Path(last["log"]).read_text(errors="replace").strip().splitlines()[-3:]
        error = f"{last['name']} exited {last['returncode']}: " + " | ".join(tail)
    return Measured(
        ok=result["ok"],
        wall_s=result["wall_s"],
        max_rss_mb=result["max_rss_kb"] / 1024,
        tree_rss_mb=peak / MB,
        steps=result["steps"],
        error=error,
        cpu_s=result.get("cpu_s", 0.0),
        server_cpu_s=server_cpu() - server_before,
    )


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a helper we started and everything under it (its own process group), and wait
    until the group is gone, so nothing writes into the work directory after we return."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            process.poll()  # reap the helper itself
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    process.poll()


# --------------------------------------------------------------------------------------------
# Servers and databases


@dataclass
class Bed:
    """The two clusters, the source database and how to reach both."""

    binaries: Any
    source: Any
    target: Any
    password: str
    work: Path
    source_url: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    generate_s: float = 0.0
    sizes: dict[str, int] = field(default_factory=dict)
    _serial: int = 0
    far_port: int | None = None  # --target-rtt-ms: the delaying relay in front of the target

    def target_url(self, dbname: str, *, with_password: bool = True) -> str:
        url = self.target.url(
            user="postgres",
            password=self.password if with_password else None,
            dbname=dbname,
            sslmode="require",
        )
        if self.far_port is not None:
            url = url.replace(f"@127.0.0.1:{self.target.port}/", f"@127.0.0.1:{self.far_port}/")
        return url

    def fresh_target(self, label: str) -> str:
        """A new empty Supabase-like database on the target; returns its name."""
        from supabase_migration.localpg import SUPABASE_ADMIN, prepare_supabase_database

        self._serial += 1
        name = f"bench_{self._serial:02d}_{label}"
        self.target.create_database(name, owner=SUPABASE_ADMIN)
        prepare_supabase_database(self.target, name)
        return name

    def drop_target(self, name: str) -> None:
        self.target.drop_database(name)

    def checkpoint(self) -> None:
        """Flush both servers' dirty buffers, so a contender does not pay for the previous one."""
        self.source.execute("CHECKPOINT")
        self.target.execute("CHECKPOINT")

    def settle(self, name: str) -> float:
        """Do now, unmeasured, what autovacuum does within a minute or two of a load (vacuum:
        hint bits and visibility map; analyze), so that the next contender does not share
        the 2 cores with the previous one's background work. Returns the seconds it took."""
        started = time.monotonic()
        self.target.execute("VACUUM (ANALYZE)", dbname=name)
        return time.monotonic() - started


@contextlib.contextmanager
def far_target(bed: Bed, rtt_ms: float, log: Callable[[str], None]) -> Iterator[None]:
    """Every contender reaches the target through bench/latency.py, which adds `rtt_ms` to
    each round trip (half each way), as a Supabase project in another region would."""
    if rtt_ms <= 0:
        yield
        return
    relay = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "latency.py"), str(bed.target.port), str(rtt_ms / 2)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        bed.far_port = int(relay.stdout.readline())
        log(f"Target reached through a relay adding {rtt_ms:g} ms per round trip")
        yield
    finally:
        bed.far_port = None
        relay.terminate()
        relay.wait()


@contextlib.contextmanager
def servers(work: Path, log: Callable[[str], None]) -> Iterator[Bed]:
    from supabase_migration.localpg import (
        SUPABASE_ADMIN,
        SUPABASE_EXTENSIONS,
        LocalServer,
        find_binaries,
        make_supabase_like,
    )

    binaries = find_binaries("system")
    if binaries is None or not binaries.supports_ssl:
        raise SystemExit(
            "bench: needs the system PostgreSQL with SSL (apt-get install postgresql "
            "postgresql-contrib), or SUPABASE_MIGRATION_PG_BINDIR pointing at one."
        )
    missing = [e for e in SUPABASE_EXTENSIONS if not binaries.has_extension(e)]
    if missing:
        log(f"note: PostgreSQL lacks {', '.join(missing)}; the target will not have them")
    password = secrets.token_urlsafe(TARGET_PASSWORD_BYTES)
    started: list[Any] = []
    try:
        source = LocalServer(binaries, work / "source")
        started.append(source)
        source.init(extra_conf=SERVER_SETTINGS)
        source.start()
        target = LocalServer(binaries, work / "target", superuser=SUPABASE_ADMIN)
        started.append(target)
        target.init(extra_conf=SERVER_SETTINGS)
        make_supabase_like(target, password=password, ssl=True)
        target.start()
        SERVER_PGDATA[:] = [source.pgdata, target.pgdata]
        log(
            f"PostgreSQL {binaries.version} ({binaries.bindir}): source on port {source.port}, "
            f"Supabase-like target (SSL, non-superuser postgres) on port {target.port}"
        )
        yield Bed(binaries, source, target, password, work)
    finally:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.cleanup()


def seed_source(bed: Bed, rows: int, log: Callable[[str], None]) -> None:
    from supabase_migration import example_app
    from supabase_migration.example_app.generate import generate

    bed.source.create_database(SOURCE_DB)
    bed.source_url = bed.source.url(dbname=SOURCE_DB)
    log(f"Generating the example app with about {rows:,} rows on the source")
    example_app.upgrade_head(bed.source_url.replace("postgresql://", "postgresql+psycopg://", 1))
    t0 = time.monotonic()
    bed.counts = generate(bed.source_url, rows)
    bed.generate_s = time.monotonic() - t0
    bed.sizes = source_sizes(bed.source_url)
    log(
        f"Source: {sum(bed.counts.values()):,} rows in {bed.generate_s:.0f} s; "
        f"database {bed.sizes['database'] / MB:,.0f} MB, user tables "
        f"{bed.sizes['tables_total'] / MB:,.0f} MB with indexes "
        f"({bed.sizes['tables_heap'] / MB:,.0f} MB heap+toast)"
    )


def source_sizes(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            """
            SELECT pg_database_size(current_database()),
                   coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint,
                   coalesce(sum(pg_table_size(c.oid)), 0)::bigint
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND n.nspname = 'public'
            """
        ).fetchone()
    assert row is not None
    return {"database": row[0], "tables_total": row[1], "tables_heap": row[2]}


def table_counts(url: str) -> dict[str, int]:
    """Exact row counts of every table in public (alembic_version included)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        counts = {}
        for name in names:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", name))
            ).fetchone()
            counts[name] = int(row[0]) if row else 0
    return counts


# --------------------------------------------------------------------------------------------
# Contenders


@dataclass
class Row:
    key: str
    contender: str
    command: str
    wall_s: float | None = None
    max_rss_mb: float | None = None
    tree_rss_mb: float | None = None
    ok: bool = False
    note: str = ""
    dbname: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    cpu_s: float | None = None  # the contender's own processes (median over repeats)
    server_cpu_s: float | None = None  # both PostgreSQL clusters meanwhile (median)
    walls: list[float] = field(default_factory=list)  # every repeat; wall_s is their median
    cpus: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rates(self, rows: int, nbytes: int) -> tuple[float | None, float | None]:
        if not self.wall_s:
            return None, None
        return rows / self.wall_s, nbytes / MB / self.wall_s


def _our_cli() -> list[str]:
    return [sys.executable, "-m", "supabase_migration.cli"]


def _cli_env(bed: Bed, dbname: str, home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        "SOURCE_DATABASE_URL": bed.source_url,
        "SUPABASE_DB_URL": bed.target_url(dbname),
        "DAGSTER_HOME": str(home / "dagster_home"),
        "SUPABASE_MIGRATION_MANIFEST": str(home / "migration.yaml"),
        "SUPABASE_MIGRATION_REPORT_DIR": str(home / "report"),
    }


def _pg_env(bed: Bed, dbname: str) -> dict[str, str]:
    """libpq settings for the pg tools: URLs without the password, the password apart."""
    return {
        "BENCH_SRC": bed.source_url,
        "BENCH_TGT": bed.target_url(dbname, with_password=False),
        "PGPASSWORD": bed.password,  # the source trusts loopback and ignores it
    }


def _check_copy(bed: Bed, dbname: str, row: Row) -> None:
    """The target must hold exactly the source's rows; otherwise the timing means nothing."""
    if not row.ok:
        return
    got = table_counts(bed.target_url(dbname))
    want = table_counts(bed.source_url)
    wrong = [f"{t}: {got.get(t)} of {n}" for t, n in want.items() if got.get(t) != n]
    if wrong:
        row.ok = False
        row.note = (row.note + "; " if row.note else "") + "row counts differ: " + ", ".join(wrong)


def _apply(row: Row, measured: Measured) -> Row:
    row.wall_s = measured.wall_s
    row.cpu_s = measured.cpu_s
    row.server_cpu_s = measured.server_cpu_s
    row.max_rss_mb = measured.max_rss_mb
    row.tree_rss_mb = measured.tree_rss_mb
    row.ok = measured.ok
    row.steps = measured.steps
    if measured.error:
        row.note = measured.error
    return row


def run_contenders(
    bed: Bed, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Row]:
    tools = bed.binaries
    pg_dump, psql, pg_restore = (str(tools.tool(t)) for t in ("pg_dump", "psql", "pg_restore"))
    w = args.workers
    rows: dict[str, Row] = {}
    selected = set(args.only or "abcdefg")

    def contender(key: str, label: str, command: str, build: Callable[[str, Path], Measured]):
        if key not in selected:
            return
        if key in "efg":
            first = rows.get("d")
            if first is None or not first.ok:
                rows[key] = Row(key, label, command, note="skipped: needs a successful (d)")
                return
            dbname = first.dbname
        else:
            dbname = bed.fresh_target(key)
        home = bed.work / f"{dbname}_{key}"  # fresh per contender and per repeat
        home.mkdir(parents=True, exist_ok=True)
        settled = bed.settle(dbname) if key in "ef" else None
        bed.checkpoint()
        log(f"({key}) {label} ...")
        row = _apply(Row(key, label, command, dbname=dbname), build(dbname, home))
        if settled is not None:
            settle = f"target settled first (VACUUM (ANALYZE), {settled:.1f} s, unmeasured)"
            row.note = "; ".join(n for n in (settle, row.note) if n)
        if key not in "eg":
            _check_copy(bed, dbname, row)
        if key == "d" and row.ok:
            row.note = _checkpoint_note(bed, dbname)
        log(
            f"({key}) {'ok' if row.ok else 'FAILED'} in {row.wall_s or 0:.1f} s, "
            f"peak RSS {row.max_rss_mb or 0:.0f} MB (tree {row.tree_rss_mb or 0:.0f} MB)"
            + (f" -- {row.note}" if row.note else "")
        )
        rows[key] = row
        if key in "abc":
            bed.drop_target(dbname)

    plain = (
        f'{pg_dump} --no-owner --no-privileges "$BENCH_SRC" | '
        f'{psql} -X -q -v ON_ERROR_STOP=1 -d "$BENCH_TGT" >/dev/null'
    )
    contender(
        "a",
        "pg_dump | psql",
        "pg_dump --no-owner --no-privileges SRC | psql -X -q -v ON_ERROR_STOP=1 -d TGT",
        lambda db, home: measure(
            "a", [{"name": "dump_psql", "shell": plain}], env=_pg_env(bed, db), cwd=home,
            work=bed.work,
        ),
    )  # fmt: skip

    def custom(db: str, home: Path) -> Measured:
        dump = home / "clinic.dump"
        steps = [
            {
                "name": "pg_dump_Fc",
                "argv": [pg_dump, "-Fc", "--no-owner", "--no-privileges", "-f", str(dump),
                         "-d", bed.source_url],
            },
            {
                "name": "pg_restore",
                "argv": [pg_restore, "-j", str(w), "--no-owner", "--no-privileges",
                         "--exit-on-error", "-d", bed.target_url(db, with_password=False),
                         str(dump)],
            },
        ]  # fmt: skip
        return measure("b", steps, env=_pg_env(bed, db), cwd=home, work=bed.work)

    contender(
        "b",
        f"pg_dump -Fc + pg_restore -j {w}",
        f"pg_dump -Fc -f FILE SRC && pg_restore -j {w} --no-owner --no-privileges -d TGT FILE",
        custom,
    )

    pgcopydb = shutil.which("pgcopydb")
    if "c" in selected and pgcopydb is None:
        rows["c"] = Row(
            "c",
            "pgcopydb clone",
            "pgcopydb clone",
            note="skipped: pgcopydb is not installed "
            "(apt-get install -y --no-install-recommends pgcopydb)",
        )
        log("(c) skipped: pgcopydb is not installed")
    elif pgcopydb is not None:

        def copydb(db: str, home: Path) -> Measured:
            argv = [pgcopydb, "clone", "--source", bed.source_url,
                    "--target", bed.target_url(db, with_password=False),
                    "--dir", str(home / "pgcopydb"), "--table-jobs", str(w),
                    "--index-jobs", str(w), "--no-owner", "--no-acl"]  # fmt: skip
            return measure(
                "c",
                [{"name": "pgcopydb_clone", "argv": argv}],
                env={**_pg_env(bed, db), "PGCOPYDB_LOG_LEVEL": "warn"},
                cwd=home,
                work=bed.work,
            )

        contender(
            "c",
            "pgcopydb clone",
            f"pgcopydb clone --table-jobs {w} --index-jobs {w} --no-owner --no-acl",
            copydb,
        )

    run_argv = [*_our_cli(), "run", "--schema-mode", "dump", "--workers", str(w)]
    run_argv += ["--no-verify", "--no-progress"]
    if args.batch_size:
        run_argv += ["--batch-size", str(args.batch_size)]
    shown = " ".join(["supabase-migrate", *run_argv[3:]])

    def ours(db: str, home: Path) -> Measured:
        env = _cli_env(bed, db, home)
        return measure("d", [{"name": "run", "argv": run_argv}], env=env, cwd=home, work=bed.work)

    contender("d", "ours: run (first load)", shown, ours)

    def verify(key: str) -> Callable[[str, Path], Measured]:
        def measured(db: str, home: Path) -> Measured:
            # Verification is run from the migration's own directory, as a user would: (d)'s
            # manifest and Dagster instance (the results land on its assets' checks).
            env = _cli_env(bed, db, bed.work / f"{db}_d")
            steps = [{"name": "verify", "argv": [*_our_cli(), "verify"]}]
            return measure(key, steps, env=env, cwd=home, work=bed.work)

        return measured

    # (g) first: straight after the load, the target's autovacuum still works through it on
    # the same 2 cores. (e), verification alone, then runs on a settled target (`Bed.settle`).
    contender("g", "ours: verify straight after the load", "supabase-migrate verify", verify("g"))
    contender("e", "ours: verify", "supabase-migrate verify", verify("e"))

    def rerun(db: str, home: Path) -> Measured:
        # A re-run is what a user does again from the same directory: (d)'s Dagster
        # instance and manifest, over (d)'s migrated target.
        env = _cli_env(bed, db, bed.work / f"{db}_d")
        return measure("f", [{"name": "rerun", "argv": run_argv}], env=env, cwd=home, work=bed.work)

    contender("f", "ours: run again (nothing changed)", shown + "  (again)", rerun)
    if "d" in rows:
        bed.drop_target(rows["d"].dbname)
    return rows


def _checkpoint_note(bed: Bed, dbname: str) -> str:
    """How much of (d)'s wall time the ranges themselves took (from the checkpoint rows)."""
    import psycopg

    with contextlib.suppress(psycopg.Error), psycopg.connect(bed.target_url(dbname)) as conn:
        row = conn.execute(
            "SELECT count(*), sum(duration_ms) / 1000.0, "
            "extract(epoch FROM max(completed_at) - min(completed_at)) "
            "FROM supabase_migration.migration_checkpoints"
        ).fetchone()
        if row:
            return f"{row[0]} ranges, {float(row[1] or 0):.1f} s summed range time"
    return ""


def warm_up(bed: Bed, workers: int, log: Callable[[str], None]) -> None:
    """One small untimed run and verify, so every module our contenders import is compiled."""
    if PYCACHE is None:
        return
    db = bed.fresh_target("warmup")
    home = bed.work / "warmup"
    steps = [
        {
            "name": "run",
            "argv": [*_our_cli(), "run", "--schema-mode", "dump", "--workers", str(max(2, workers)),
                     "--include", "public.providers", "--no-progress"],
            # Verification FAILs here by design: the other tables exist (schema mode dump) but
            # are not in the manifest, so the security step leaves their RLS off.
            "ok_codes": [0, 1],
        },
        {
            "name": "verify",
            "argv": [*_our_cli(), "verify", "--tables", "public.providers"],
            "ok_codes": [0, 1],
        },
    ]  # fmt: skip
    measured = measure("warmup", steps, env=_cli_env(bed, db, home), cwd=home, work=bed.work)
    log(
        f"Warm-up (untimed, bytecode into {PYCACHE}): {measured.wall_s:.1f} s"
        + ("" if measured.ok else f" -- {measured.error}")
    )
    bed.drop_target(db)


# --------------------------------------------------------------------------------------------
# Sweep: batch size x workers for our run, plus a raw-COPY probe


def run_sweep(bed: Bed, args: argparse.Namespace, log: Callable[[str], None]) -> list[Row]:
    baseline = argparse.Namespace(**{**vars(args), "only": "a"})
    rows: list[Row] = list(run_contenders(bed, baseline, log).values())
    for workers in args.sweep_workers:
        for batch in args.sweep_batches:
            key = f"w{workers}_b{batch}"
            db = bed.fresh_target(key)
            home = bed.work / f"sweep_{key}"
            home.mkdir(parents=True, exist_ok=True)
            argv = [*_our_cli(), "run", "--schema-mode", "dump", "--workers", str(workers)]
            argv += ["--batch-size", str(batch), "--no-verify", "--no-progress"]
            bed.checkpoint()
            log(f"sweep: workers={workers} batch={batch:,} ...")
            row = Row(key, f"ours, {workers} worker(s), batch {batch:,}", " ".join(argv[3:]))
            measured = measure(
                key,
                [{"name": "run", "argv": argv}],
                env=_cli_env(bed, db, home),
                cwd=home,
                work=bed.work,
            )
            _apply(row, measured)
            _check_copy(bed, db, row)
            if row.ok:
                row.note = _checkpoint_note(bed, db)
            log(f"sweep: {row.wall_s or 0:.1f} s {'ok' if row.ok else 'FAILED ' + row.note}")
            rows.append(row)
            bed.drop_target(db)
    return rows


PROBE_VARIANTS = (
    # label, binary COPY, what of the post-data section exists before the load
    ("binary COPY into fully indexed tables (what we did)", True, "all"),
    ("text COPY into fully indexed tables", False, "all"),
    ("binary COPY with primary keys only, rest after (close to what we do)", True, "pk"),
    ("binary COPY into bare tables, then indexes + FKs (pg_dump order)", True, "none"),
    ("text COPY into bare tables, then indexes + FKs (pg_dump order)", False, "none"),
)


def copy_probe(bed: Bed, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """What our copy path costs without Dagster: one process, one transaction per table,
    COPY source -> target as copy.py streams it, in text or binary, with the schema's indexes,
    unique constraints and FKs created before or after the load; plus the checksum query every
    range runs on the source, over whole tables."""
    import psycopg

    from supabase_migration import sqlbuild
    from supabase_migration.catalog import read_tables
    from supabase_migration.copy import CopyOptions, stream_range
    from supabase_migration.ranges import KeyRange

    tool = bed.binaries.tool
    probe_dir = bed.work / "probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    dump = probe_dir / "schema.dump"
    env = {**os.environ, **_pg_env(bed, "postgres")}
    subprocess.run(
        [tool("pg_dump"), "-Fc", "--schema-only", "--no-owner", "--no-privileges", "-f", dump,
         "-d", bed.source_url],
        env=env, check=True,
    )  # fmt: skip
    listing = subprocess.run(
        [tool("pg_restore"), "-l", "--section=post-data", dump],
        env=env, check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    with psycopg.connect(bed.source_url, autocommit=True) as source:
        tables = [t for t in read_tables(source, ["public"]) if t.name != "alembic_version"]
        pk_names = {
            r[0]
            for r in source.execute(
                "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
                " WHERE c.contype = 'p' AND n.nspname = 'public'"
            )
        }

    def is_pk(line: str) -> bool:
        words = line.split()
        return len(words) > 6 and words[3] == "CONSTRAINT" and words[6] in pk_names

    entries = [line for line in listing if line.strip() and not line.startswith(";")]
    lists = {
        "pk": [line for line in entries if is_pk(line)],
        "rest": [line for line in entries if not is_pk(line)],
    }
    for name, lines in lists.items():
        (probe_dir / f"{name}.list").write_text("\n".join(lines) + "\n")

    def restore(db: str, *selection: str | Path) -> float:
        t0 = time.monotonic()
        subprocess.run(
            [tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", *selection,
             "-d", bed.target_url(db, with_password=False), dump],
            env=env, check=True,
        )  # fmt: skip
        return time.monotonic() - t0

    def load(db: str, binary: bool) -> tuple[float, int]:
        nbytes = 0
        t0 = time.monotonic()
        with (
            psycopg.connect(bed.source_url, autocommit=True) as source,
            psycopg.connect(bed.target_url(db), autocommit=True) as target,
        ):
            for table in tables:
                with source.transaction(), target.transaction():
                    target.execute("SET LOCAL session_replication_role = replica")
                    target.execute("SET LOCAL statement_timeout = 0")
                    nbytes += stream_range(
                        source,
                        target,
                        table,
                        KeyRange(table.qualified_name, 0, None, None),
                        sqlbuild.table_ident(table),
                        binary,
                        CopyOptions(),
                    )
        return time.monotonic() - t0, nbytes

    results: list[dict[str, Any]] = []
    for label, binary, before in PROBE_VARIANTS:
        db = bed.fresh_target("probe")
        bed.checkpoint()
        restore(db, "--section=pre-data")
        cpu_before = server_cpu()
        index_s = 0.0
        if before == "all":
            index_s += restore(db, "--section=post-data")
        elif before == "pk":
            index_s += restore(db, "-L", probe_dir / "pk.list")
        copy_s, nbytes = load(db, binary)
        if before == "pk":
            index_s += restore(db, "-L", probe_dir / "rest.list")
        elif before == "none":
            index_s += restore(db, "--section=post-data")
        cpu_s = server_cpu() - cpu_before
        log(
            f"probe: {label}: COPY {copy_s:.1f} s ({nbytes / MB:,.0f} MB streamed), "
            f"indexes+constraints {index_s:.1f} s, total {copy_s + index_s:.1f} s, "
            f"server CPU {cpu_s:.1f} s"
        )
        results.append(
            {
                "probe": label,
                "copy_s": copy_s,
                "index_fk_s": index_s,
                "data_plus_index_s": copy_s + index_s,
                "server_cpu_s": cpu_s,
                "bytes_streamed": nbytes,
            }
        )
        bed.drop_target(db)

    # The source-side checksum every range computes before it copies (copy._source_checksum).
    t0, cpu_before = time.monotonic(), server_cpu()
    with psycopg.connect(bed.source_url, autocommit=True) as source:
        for table in tables:
            with source.transaction():
                source.execute(sqlbuild.NORMALIZE_TEXT_OUTPUT)
                source.execute(sqlbuild.range_checksum_query(table, None, None)).fetchone()
    checksum_s, cpu_s = time.monotonic() - t0, server_cpu() - cpu_before
    log(f"probe: source checksum over every table: {checksum_s:.1f} s, server CPU {cpu_s:.1f} s")
    results.append(
        {
            "probe": "source checksum query over every table",
            "seconds": checksum_s,
            "server_cpu_s": cpu_s,
        }
    )
    return results


def merge_rows(into: dict[str, Row], new: Iterable[Row]) -> None:
    """Fold one repeat's rows into the others: median wall time, worst RSS, all notes."""
    for row in new:
        old = into.setdefault(row.key, Row(row.key, row.contender, row.command, ok=True))
        old.ok = old.ok and row.ok
        old.notes.append(row.note)
        old.note = old.note or row.note
        if not row.ok:
            old.note = row.note or old.note  # a failure's reason wins
            continue  # a failed run's time is not a timing
        if row.wall_s is not None:
            old.walls.append(row.wall_s)
        old.wall_s = statistics.median(old.walls) if old.walls else None
        if row.cpu_s is not None and row.server_cpu_s is not None:
            old.cpus.append((row.cpu_s, row.server_cpu_s))
            old.cpu_s = statistics.median(c for c, _ in old.cpus)
            old.server_cpu_s = statistics.median(c for _, c in old.cpus)
        old.max_rss_mb = max(old.max_rss_mb or 0.0, row.max_rss_mb or 0.0) or None
        old.tree_rss_mb = max(old.tree_rss_mb or 0.0, row.tree_rss_mb or 0.0) or None
        old.steps += row.steps


def merge_probes(runs: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Median of every number over the repeats, per probe variant."""
    merged: list[dict[str, Any]] = []
    for variant in zip(*runs, strict=True):
        out: dict[str, Any] = {"probe": variant[0]["probe"], "repeats": len(variant)}
        for key, value in variant[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [v[key] for v in variant]
                out[key] = statistics.median(values)
                out[key + "_each"] = values
        merged.append(out)
    return merged


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: Sequence[Row], total_rows: int, nbytes: int) -> str:
    header = "| | contender | wall s (median) | each run s | rows/s | MB/s | CPU s: ours "
    header += "| CPU s: servers | peak RSS MB (largest process) | peak RSS MB (process tree) "
    header += "| ok | note |\n"
    header += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    lines = []
    for row in rows:
        per_row, per_mb = row.rates(total_rows, nbytes)
        lines.append(
            f"| {row.key} | {_cell(row.contender)} | {_fmt(row.wall_s, '.1f')} "
            f"| {' / '.join(f'{w:.1f}' for w in row.walls) or '-'} "
            f"| {_fmt(per_row, ',.0f')} | {_fmt(per_mb, '.1f')} "
            f"| {_fmt(row.cpu_s, '.1f')} | {_fmt(row.server_cpu_s, '.1f')} "
            f"| {_fmt(row.max_rss_mb, ',.0f')} | {_fmt(row.tree_rss_mb, ',.0f')} "
            f"| {'yes' if row.ok else 'no'} | {_cell(row.note)} |"
        )
    return header + "\n".join(lines) + "\n"


def ratios(rows: dict[str, Row]) -> list[tuple[str, float | None]]:
    def ratio(a: str, b: str) -> float | None:
        x, y = rows.get(a), rows.get(b)
        if x and y and x.ok and y.ok and x.wall_s and y.wall_s:
            return x.wall_s / y.wall_s
        return None

    return [
        ("(d)/(a): our run vs pg_dump | psql", ratio("d", "a")),
        ("(d)/(b): our run vs pg_dump -Fc + pg_restore -j", ratio("d", "b")),
        ("(d)/(c): our run vs pgcopydb clone", ratio("d", "c")),
        ("(e)/(d): verify vs our run", ratio("e", "d")),
        ("(f)/(d): re-run with nothing changed vs first run", ratio("f", "d")),
        ("(g)/(d): verify straight after the load vs first run", ratio("g", "d")),
    ]


def environment() -> dict[str, Any]:
    def version(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        except OSError:
            return None
        lines = (done.stdout + done.stderr).strip().splitlines()
        named = [line for line in lines if "version" in line]
        return (named or lines or [None])[0]

    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pgcopydb": version(["pgcopydb", "--version"]) if shutil.which("pgcopydb") else None,
        "bytecode": f"cached in {PYCACHE}" if PYCACHE else "as the environment has it (cold)",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=3_000_000, help="source rows (total)")
    parser.add_argument("--workers", type=int, default=2, help="jobs for every contender")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument(
        "--batch-size", type=int, help="our --batch-size for (d)/(f) (default: ours)"
    )
    parser.add_argument(
        "--only", help="contenders to run, e.g. 'ad' (default abcdefg; e, f and g need d)"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead: our run at several batch sizes and worker counts, and a COPY probe",
    )
    parser.add_argument("--sweep-rows", type=int, default=500_000, help="dataset for --sweep")
    parser.add_argument(
        "--sweep-batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10_000, 100_000, 200_000],
        help="comma-separated batch sizes (default 10000,100000,200000)",
    )
    parser.add_argument(
        "--sweep-workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2],
        help="comma-separated worker counts (default 1,2)",
    )
    parser.add_argument("--no-probe", action="store_true", help="--sweep without the COPY probe")
    parser.add_argument(
        "--pycache",
        type=Path,
        default=Path.home() / ".cache" / "supabase-migration-bench" / "pycache",
        help="bytecode cache for our CLI's processes (PYTHONPYCACHEPREFIX), warmed untimed",
    )
    parser.add_argument(
        "--cold-imports",
        action="store_true",
        help="leave PYTHONDONTWRITEBYTECODE/.pyc as the environment has them (no warm-up)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run everything N times; report the median"
    )
    parser.add_argument(
        "--target-rtt-ms",
        type=float,
        default=0.0,
        help="reach the target through a relay adding this many ms per round trip (a remote "
        "Supabase: 10-80 ms); default 0, loopback",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--measure-helper", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_helper:
        return measure_main(args.measure_helper)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so every server we started is stopped.
    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    # Also when started in the background, where the shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    global PYCACHE
    PYCACHE = None if args.cold_imports else args.pycache.expanduser().resolve()
    if PYCACHE is not None:
        PYCACHE.mkdir(parents=True, exist_ok=True)
    from supabase_migration.localpg import private_tempdir

    work = private_tempdir("smbench-")  # reachable by the unprivileged server user as root
    rows_wanted = args.sweep_rows if args.sweep else args.rows
    env_info = environment()
    log(f"Work directory {work}; {env_info['host_cpus']} CPUs, load {env_info['load_average']}")
    started = time.monotonic()
    try:
        with servers(work, log) as bed, far_target(bed, args.target_rtt_ms, log):
            seed_source(bed, rows_wanted, log)
            warm_up(bed, max([args.workers, *args.sweep_workers]), log)
            total_rows = sum(table_counts(bed.source_url).values())
            nbytes = bed.sizes["tables_total"]
            probe: list[dict[str, Any]] = []
            ratio_list: list[tuple[str, float | None]] = []
            merged: dict[str, Row] = {}
            probes: list[list[dict[str, Any]]] = []
            for repeat in range(args.repeat):
                if args.repeat > 1:
                    log(f"Repeat {repeat + 1} of {args.repeat}")
                if args.sweep:
                    merge_rows(merged, run_sweep(bed, args, log))
                    if not args.no_probe:
                        probes.append(copy_probe(bed, log))
                else:
                    merge_rows(merged, run_contenders(bed, args, log).values())
            ordered = list(merged.values())
            if args.sweep:
                probe = merge_probes(probes) if probes else []
                name = "sweep"
            else:
                ordered.sort(key=lambda r: r.key)
                ratio_list = ratios(merged)
                name = f"compare-rtt{args.target_rtt_ms:g}ms" if args.target_rtt_ms else "compare"
            env_info["load_average_end"] = os.getloadavg()
            env_info["total_s"] = time.monotonic() - started
            env_info["postgres"] = f"{bed.binaries.version} ({bed.binaries.bindir})"
            report = render(
                name, args, bed, ordered, total_rows, nbytes, ratio_list, probe, env_info
            )
            write_outputs(args.out, name, args, bed, ordered, total_rows, ratio_list, probe,
                          env_info, report)  # fmt: skip
            print(report)
    except KeyboardInterrupt:
        log("Interrupted: servers stopped.")
        return 130
    finally:
        if args.keep:
            log(f"Kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def render(
    name: str,
    args: argparse.Namespace,
    bed: Bed,
    rows: Sequence[Row],
    total_rows: int,
    nbytes: int,
    ratio_list: Sequence[tuple[str, float | None]],
    probe: Sequence[dict[str, Any]],
    env_info: dict[str, Any],
) -> str:
    lines = [
        f"## Benchmark ({name}): {total_rows:,} rows, "
        f"{nbytes / MB:,.0f} MB of user tables with indexes "
        f"({bed.sizes['tables_heap'] / MB:,.0f} MB heap+toast, database "
        f"{bed.sizes['database'] / MB:,.0f} MB)",
        "",
        f"PostgreSQL {env_info['postgres']}, {env_info['host_cpus']} CPUs, load average "
        f"{_load(env_info['load_average'])} at start and {_load(env_info['load_average_end'])} "
        f"at end; workers/jobs = {args.sweep_workers if name == 'sweep' else args.workers}."
        + (
            f" The target is reached through a relay adding {args.target_rtt_ms:g} ms to every "
            "round trip (bench/latency.py), as a remote Supabase would."
            if args.target_rtt_ms
            else ""
        ),
        "rows/s and MB/s are source rows and source table size (with indexes) over wall time. "
        "CPU s: user+system seconds of the contender's own processes, and of both PostgreSQL "
        "clusters while it ran (less noisy than wall time on a shared machine). "
        f"Python bytecode for our CLI: {env_info['bytecode']}.",
        "",
        markdown(rows, total_rows, nbytes),
    ]
    if ratio_list:
        lines += ["| ratio of wall times | value |", "|---|---:|"]
        lines += [f"| {_cell(label)} | {_fmt(value, '.2f')} |" for label, value in ratio_list]
        lines.append("")
    if probe:
        lines += [
            "### COPY probe (one process, one transaction per table, no Dagster)",
            "",
            "| variant | COPY s | indexes + constraints s | total s | each run total s "
            "| server CPU s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for p in probe:
            total = p.get("data_plus_index_s", p.get("seconds", 0.0))
            each = p.get("data_plus_index_s_each", p.get("seconds_each", [total]))
            cells = [
                p["probe"],
                _fmt(p.get("copy_s"), ".1f"),
                _fmt(p.get("index_fk_s"), ".1f"),
                f"{total:.1f}",
                " / ".join(f"{v:.1f}" for v in each),
                _fmt(p.get("server_cpu_s"), ".1f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    command = "uv run python bench/run.py " + shlex.join(sys.argv[1:])
    lines.append(f"Command: `{command.strip()}`")
    return "\n".join(lines)


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def write_outputs(
    out: Path,
    name: str,
    args: argparse.Namespace,
    bed: Bed,
    rows: Sequence[Row],
    total_rows: int,
    ratio_list: Sequence[tuple[str, float | None]],
    probe: Sequence[dict[str, Any]],
    env_info: dict[str, Any],
    report: str,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"{name}_{total_rows}"
    (out / f"{stamp}.md").write_text(report + "\n")
    data = {
        "mode": name,
        "command": ["bench/run.py", *sys.argv[1:]],
        "environment": env_info,
        "source": {
            "rows_total": total_rows,
            "rows_per_table": bed.counts,
            "generate_s": bed.generate_s,
            "bytes": bed.sizes,
        },
        "server_settings": SERVER_SETTINGS,
        "rows": [{k: v for k, v in asdict(r).items()} for r in rows],
        "ratios": {label: value for label, value in ratio_list},
        "probe": list(probe),
    }
    (out / f"{stamp}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"Wrote {out / (stamp + '.md')} and {out / (stamp + '.json')}", file=sys.stderr)


if __name__ == "__main__":
    # Run from anywhere: the package lives in the repository root.
    sys.path.insert(0, str(REPO_DIR))
    sys.exit(main())
