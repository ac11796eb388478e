"""`supabase-migrate`: a thin shell over `commands`.

Every failure a user can act on ends as one sentence on stderr with exit code 2 (bad input) or
1 (migration or verification failed); no traceback, no password, no row values.
Exit codes: 0 all done, 1 migration/verification failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import psycopg

from . import __version__
from .connections import database_error_exit_code
from .errors import (
    ConfigError,
    InterruptedBeforeCopying,
    MigrationError,
    VerificationInterrupted,
)
from .inputs import INSECURE_ENV, SOURCE_URL_ENV, SSLROOTCERT_ENV, TARGET_URL_ENV
from .manifest import LARGEST_COUNT, MANIFEST_ENV
from .memory import freeze_for_exit, loading_long_lived, release
from .redaction import describe_pg_error, redact_text
from .report import (
    DEFAULT_REPORT_DIR,
    REPORT_BASENAME,
    REPORT_DIR_ENV,
    markdown_table,
    report_dir,
)
from .verify import DEFAULT_SAMPLE_SIZE

if TYPE_CHECKING:  # imported when a command needs them: `verify` starts without Dagster
    from .commands import RunSummary
    from .inputs import Settings

# Two copy workers: with both databases on one 2-core machine the 3M-row benchmark's first load
# is 5-7 s (about 20%) faster than with one (docs/benchmark.md); remote databases gain more.
DEFAULT_WORKERS = 2

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _whole(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be from {low:,} to {high:,}")
    return value


def _positive(text: str) -> int:
    return _whole(text, 1, LARGEST_COUNT)


def _seed(text: str) -> int:
    """Verification's samples hash with it as a bigint."""
    return _whole(text, -(2**63), 2**63 - 1)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one sentence with exit code 2, and takes flags
    only as written: an abbreviation a later flag could make ambiguous would change a script."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message[0].upper()}{message[1:]} (see `supabase-migrate --help`).")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="supabase-migrate",
        description="Migrate a PostgreSQL database into Supabase: resumable, verified, PHI-safe.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def connection_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", help=f"source URL (prefer the {SOURCE_URL_ENV} variable)")
        p.add_argument("--target", help=f"Supabase URL (prefer the {TARGET_URL_ENV} variable)")
        p.add_argument("--sslrootcert", help="CA certificate for sslmode verify-ca/verify-full")
        p.add_argument(
            "--allow-insecure-ssl",
            action="store_true",
            help="permit sslmode disable/allow/prefer for a non-loopback host (not for PHI)",
        )
        p.add_argument(
            "--manifest",
            type=Path,
            help=f"manifest path (default ${MANIFEST_ENV} or ./migration.yaml)",
        )

    def selection_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--schemas", type=_csv, default=(), help="source schemas (default: all)")
        p.add_argument("--include", type=_csv, default=(), help="schema.table globs to include")
        p.add_argument("--exclude", type=_csv, default=(), help="schema.table globs to exclude")
        p.add_argument("--batch-size", type=_positive, help="rows per key range")
        p.add_argument(
            "--schema-mode",
            choices=("alembic", "dump", "none"),
            help="how the schema reaches the target: dump (pg_dump --schema-only of the source, "
            "the default), alembic (upgrade head with --alembic-config), none (the tables are "
            "there already, with the source's columns)",
        )
        p.add_argument("--alembic-config", help="path to the application's alembic.ini")

    p = sub.add_parser("init", help="introspect the source and write migration.yaml")
    connection_args(p)
    selection_args(p)

    p = sub.add_parser("plan", help="preflight and range plan; writes nothing on the target")
    connection_args(p)
    selection_args(p)

    def verify_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--sample-size",
            type=_positive,
            default=DEFAULT_SAMPLE_SIZE,
            help="rows compared column by column",
        )
        p.add_argument("--seed", type=_seed, help="sample seed (default: random, recorded)")
        p.add_argument(
            "--report",
            type=Path,
            help=f"report directory (default ${REPORT_DIR_ENV} or ./{DEFAULT_REPORT_DIR})",
        )

    for name, text in (
        ("run", "migrate: schema, every range not done or changed, sequences, verification"),
        ("resume", "copy only the ranges whose checkpoint is not completed"),
    ):
        p = sub.add_parser(name, help=text)
        connection_args(p)
        selection_args(p)
        p.add_argument(
            "--workers",
            type=_positive,
            default=DEFAULT_WORKERS,
            help=f"parallel copy processes (default {DEFAULT_WORKERS})",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress display")
        p.add_argument("--no-verify", action="store_true", help="skip the verification report")
        p.add_argument(
            "--new-source",
            action="store_true",
            help="the source moved (restored on another server): migrate from this one, "
            "which the target does not record",
        )
        if name == "run":
            p.add_argument(
                "--repair",
                action="store_true",
                help="also re-sync the ranges the last verification report found different "
                "(the target's rows there are made the source's: inserted, updated, deleted)",
            )
        verify_args(p)

    p = sub.add_parser("verify", help="compare target with source; writes the PASS/FAIL report")
    connection_args(p)
    verify_args(p)
    p.add_argument("--tables", type=_csv, default=(), help="only these schema.table names")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("demo", help="migrate the example clinic app between two local servers")
    p.add_argument("--rows", type=_positive, default=20_000, help="rows to generate (total)")
    p.add_argument(
        "--workers", type=_positive, default=DEFAULT_WORKERS, help="parallel copy processes"
    )
    p.add_argument("--dir", type=Path, default=Path("supabase-migration-demo"), help="work dir")
    p.add_argument("--ui", action="store_true", help="then open the Dagster UI on the demo")
    p.add_argument(
        "--fail-once",
        action="store_true",
        help="make a few partitions fail on their first attempt, to practise backfilling them",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress display")

    p = sub.add_parser("status", help="partitions and rows per table, from the checkpoints")
    connection_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _export_connection_settings(args: argparse.Namespace) -> None:
    """Flags win over the environment; they travel to runs and workers only as env vars."""
    if getattr(args, "source", None):
        os.environ[SOURCE_URL_ENV] = args.source
    if getattr(args, "target", None):
        os.environ[TARGET_URL_ENV] = args.target
    if getattr(args, "sslrootcert", None):
        os.environ[SSLROOTCERT_ENV] = args.sslrootcert
    if getattr(args, "allow_insecure_ssl", False):
        os.environ[INSECURE_ENV] = "1"
    if getattr(args, "report", None):
        os.environ[REPORT_DIR_ENV] = str(args.report.resolve())


def _settings(args: argparse.Namespace) -> Settings:
    from .inputs import Settings
    from .manifest import default_path

    return Settings(
        manifest_path=args.manifest or default_path(),
        workers=getattr(args, "workers", 1),
        batch_size=getattr(args, "batch_size", None),
        schema_mode=getattr(args, "schema_mode", None),
        alembic_config=getattr(args, "alembic_config", None),
        schemas=getattr(args, "schemas", ()),
        include=getattr(args, "include", ()),
        exclude=getattr(args, "exclude", ()),
        verify=not getattr(args, "no_verify", False),
        sample_size=getattr(args, "sample_size", None) or DEFAULT_SAMPLE_SIZE,
        seed=getattr(args, "seed", None),
        repair=getattr(args, "repair", False),
        new_source=getattr(args, "new_source", False),
    )


class Progress:
    """Rows, rows/s and ETA per table on a terminal; silent when output is not a terminal."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.last_lines = 0

    def __call__(self, tables: dict[str, dict[str, int]]) -> None:
        if not self.tty:
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        lines = []
        for name, t in sorted(tables.items()):
            total = t["pending"] + t["completed"] + t["failed"]
            rate = t["rows"] / elapsed
            left = t["pending"] + t["failed"]
            eta = (elapsed / max(t["completed"], 1)) * left if t["completed"] else 0
            lines.append(
                f"{name:40.40} {t['completed']:>6}/{total:<6} ranges {t['rows']:>12,} rows "
                f"{rate:>10,.0f} rows/s  ETA {eta:5.0f}s"
                + (f"  {t['failed']} failed" if t["failed"] else "")
            )
        if self.last_lines:
            self.stream.write(f"\x1b[{self.last_lines}F")
        self.stream.write("\n".join(f"{line}\x1b[K" for line in lines) + "\n")
        self.stream.flush()
        self.last_lines = len(lines)


def _print_status(
    tables: dict[str, dict[str, int]], as_json: bool, note: str | None = None
) -> None:
    if as_json:
        shown = {"tables": tables, **({"note": note} if note else {})}
        print(json.dumps(shown, indent=2, sort_keys=True))
        return
    if not tables:
        print(
            note
            or "Nothing planned on the target yet: `supabase-migrate run` plans and copies "
            "(`plan` only shows what it would do)."
        )
        return
    headers = ["table", "completed", "pending", "failed", "rows"]
    rows = [
        [name, t["completed"], t["pending"], t["failed"], f"{t['rows']:,}"]
        for name, t in sorted(tables.items())
    ]
    if any(t.get("indexes_waiting") for t in tables.values()):
        # Dropped for the first load; built when the table's last range is copied.
        headers.append("indexes to build")
        for row, (_, t) in zip(rows, sorted(tables.items()), strict=True):
            row.append(t.get("indexes_waiting", 0))
    print(markdown_table(headers, rows))
    if note:
        print(f"\n{note}")


def _finish(summary: RunSummary) -> int:
    _print_status(summary.tables, as_json=False)
    for failure in summary.failures[:20]:
        print(f"failed: {failure}", file=sys.stderr)
    if summary.ok:
        checked = " and verified" if summary.verified else ""
        print(f"Migration complete{checked} in {summary.duration_s:.1f} s.")
        if summary.report_dir:
            print(f"Verification report: {summary.report_dir / (REPORT_BASENAME + '.html')}")
        return EXIT_OK
    if summary.copied:
        print(
            "Every range was copied but verification FAILED; see "
            f"{summary.report_dir / (REPORT_BASENAME + '.html')} for what differs.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if summary.failures:
        print(
            f"{len(summary.failures)} failure(s) stopped the copy; fix the cause and run "
            "`supabase-migrate resume` (or backfill failed partitions in the UI).",
            file=sys.stderr,
        )
    else:
        pending = sum(t["pending"] for t in summary.tables.values())
        # No step of this run failed: another run holds them, or the target lost commits it
        # had confirmed (a crash or failover without synchronous commit).
        print(
            f"{pending} range(s) are still pending though no copy of this run failed: another "
            "run may hold them, or the target lost commits (a crash or a failover); run "
            "`supabase-migrate resume` (once any other run has finished) to copy them.",
            file=sys.stderr,
        )
    return EXIT_FAILED


def dispatch(args: argparse.Namespace) -> int:
    _export_connection_settings(args)
    if args.command == "verify":
        # Before anything imports Dagster: verify_command loads it beside the checks.
        from .verify_command import verify

        report = verify(_settings(args), args.report, args.tables)
        print(report.to_json() if args.json else report.to_markdown())
        if not report.passed:
            where = (args.report or report_dir()) / f"{REPORT_BASENAME}.html"
            repair = "supabase-migrate run --repair" + (
                f" --report {args.report}" if args.report else ""
            )
            print(f"{report.failure_sentence(repair)}; see {where}.", file=sys.stderr)
        return report.exit_code
    if args.command == "status":
        from .status_command import status, status_note

        tables = status()
        _print_status(tables, args.json, status_note(tables, _settings(args).manifest_path))
        return EXIT_OK
    # Most of what Dagster's import makes lives as long as the process (see memory.py): no
    # collection walks it again and again while it loads (0.2 s of the startup every copy
    # waits for).
    try:
        with loading_long_lived():
            from . import commands  # noqa: F401
    except KeyboardInterrupt:  # seconds of importing Dagster: no run has begun
        if args.command == "run":
            raise InterruptedBeforeCopying from None
        raise
    try:
        return _dispatch_command(args)
    finally:
        release()


def _dispatch_command(args: argparse.Namespace) -> int:
    from . import commands, inputs

    if args.command == "init":
        manifest = inputs.init(_settings(args))
        print(f"Wrote {manifest.path} with {len(manifest.tables)} tables; review it, then `run`.")
        return EXIT_OK
    if args.command == "plan":
        report = commands.plan(_settings(args), log=lambda m: print(m, file=sys.stderr))
        from .preflight import findings_markdown

        print("## Preflight\n")
        print(findings_markdown(report.findings) if report.findings else "No findings.")
        print("\n## Ranges\n")
        print(markdown_table(["table", "key", "ranges", "note"], report.tables))
        return EXIT_BAD_INPUT if report.has_errors else EXIT_OK
    if args.command in ("run", "resume"):
        progress = None if args.no_progress else Progress()
        summary = commands.run(
            _settings(args),
            resume=args.command == "resume",
            progress=progress,
            log=lambda m: print(m, file=sys.stderr),
        )
        return _finish(summary)
    if args.command == "demo":
        from .demo import demo

        summary = demo(
            rows=args.rows,
            workdir=args.dir.resolve(),
            ui=args.ui,
            fail_once=args.fail_once,
            workers=args.workers,
            log=lambda m: print(m, file=sys.stderr),
            progress=None if args.no_progress else Progress(),
        )
        code = _finish(summary)
        if args.fail_once and summary.failures:
            print(
                "These failures were injected by --fail-once on purpose; backfill them as "
                "shown above (exit code 1 means the copy is incomplete).",
                file=sys.stderr,
            )
        return code
    raise ConfigError(f"Unknown command {args.command}.")


def main(argv: Sequence[str] | None = None) -> int:
    # psycopg logs "error ignored terminating Copy" when a backend dies mid-COPY; the retry
    # that follows is what the user needs to hear about, and it reports itself.
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)
    secrets = [os.environ.get(SOURCE_URL_ENV, ""), os.environ.get(TARGET_URL_ENV, "")]
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        secrets += [getattr(args, "source", None) or "", getattr(args, "target", None) or ""]
        code = dispatch(args)
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return code
    except MigrationError as exc:
        print(f"error: {redact_text(exc.message, _passwords(secrets))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `status --json | head`: the reader has what it wanted
        # What is still buffered goes nowhere, quietly, when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        if exc.filename is not None:  # a file the user named: manifest, report, policy
            sentence = f"{exc.strerror or type(exc).__name__} ({exc.filename})."
            print(f"error: {redact_text(sentence, _passwords(secrets))}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"error: {exc.strerror or type(exc).__name__}.", file=sys.stderr)  # disk full ...
        return EXIT_FAILED
    except psycopg.Error as exc:
        # A database error no step translated on its way up: still one sentence, no DETAIL.
        sentence = describe_pg_error(exc, context="A database request failed")
        print(f"error: {redact_text(sentence, _passwords(secrets))}.", file=sys.stderr)
        return database_error_exit_code(exc)
    except KeyboardInterrupt as exc:
        if isinstance(exc, VerificationInterrupted):
            said = (
                "Interrupted while verifying; every range is copied. Run `supabase-migrate verify`."
            )
        elif command == "run" and isinstance(exc, InterruptedBeforeCopying):
            said = "Interrupted before this run copied anything. Run `supabase-migrate run` again."
        elif command in ("run", "resume"):
            said = "Interrupted; completed ranges are kept. Run `supabase-migrate resume`."
        elif command == "demo":
            said = "Interrupted."
        else:
            said = "Interrupted; nothing this command writes was left half done."
        print(said, file=sys.stderr)
        return EXIT_FAILED


def console_main() -> int:
    """The `supabase-migrate` program: `main`, then a quick exit.

    Nothing runs after `main` but the interpreter's teardown, whose last garbage collections
    walk every object Dagster, SQLAlchemy and the run left behind: 0.3-1 s of one core at the
    end of every command, measured. Frozen objects are skipped; atexit handlers, flushing and
    closing files happen as usual (`main` closes its files and connections itself). Not in
    `main`, which tests call in-process, where frozen garbage would never be freed.
    """
    # A supervisor's stop (`kill`, `timeout`, systemd, `docker stop`) is Ctrl-C too: the same
    # sentence and the same clean end, also before the first Dagster run, which until then
    # gives SIGTERM its own handler (it copies Ctrl-C's there as a run ends).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return main()
    finally:
        _forget_handled_interrupt()
        freeze_for_exit()


def _forget_handled_interrupt() -> None:
    """CPython notes a KeyboardInterrupt that passes through `exec` of a string as unhandled,
    even when `main` catches it afterwards; Ctrl-C landing while a dataclass or namedtuple
    is built (Dagster's imports build many) then made `python -m supabase_migration.cli`
    end by SIGINT instead of with our exit code. Running any string resets that note; a
    KeyboardInterrupt leaving this function still counts as unhandled, as it should."""
    exec("pass")


def _passwords(urls: Sequence[str]) -> list[str]:
    from .conninfo import parse_database_url

    found = []
    for url in urls:
        if not url:
            continue
        try:
            parsed = parse_database_url(url, label="input", allow_insecure=True)
        except MigrationError:
            continue
        if parsed.password:
            found.append(parsed.password)
    return found


if __name__ == "__main__":
    sys.exit(console_main())
