"""Rendering results for people: Markdown for the Dagster UI and the CLI, HTML and JSON files.

The verification report is built only from `CheckOutcome`s, whose descriptions and details hold
counts, object names, partition keys and primary keys: no row value can reach a report file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import html
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ConfigError, read_user_text
from .verify import (
    CHECK_NAMES,
    CHECKSUMS,
    CONSTRAINTS,
    ERROR,
    INDEXES,
    MATVIEW_CONTENT,
    ROW_COUNT,
    SCHEMA_OBJECTS,
    CheckOutcome,
)

REPORT_DIR_ENV = "SUPABASE_MIGRATION_REPORT_DIR"
DEFAULT_REPORT_DIR = "migration-report"
REPORT_BASENAME = "verification_report"
FAILING_FINDING_SEVERITIES = {"error", "critical"}
# Outcomes of no table: a materialized view's, and the schemas' views, rules, routines and types.
_NOT_TABLES = (MATVIEW_CONTENT, SCHEMA_OBJECTS)
# A schema difference's group in a check's details, and how the report says it.
_DIFFERENCES = {
    "missing": "missing on target",
    "extra": "extra on target",
    "different": "different",
    "search_path": "its search_path no longer reaches the extensions it did",
    "left_out": "left out (a language the target's postgres may not use)",
    "printed_otherwise": "printed otherwise by another PostgreSQL version",
}


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_dir() -> Path:
    return Path(os.environ.get(REPORT_DIR_ENV) or DEFAULT_REPORT_DIR)


def ranges_to_repair(report: Mapping[str, Any]) -> dict[str, set[str]]:
    """The partitions a report's failed checks name to re-run, by table."""
    found: dict[str, set[str]] = {}
    for check in report.get("checks") or ():
        keys = (check.get("details") or {}).get("partitions_to_rerun") or ()
        if not check.get("passed", True) and keys:
            found.setdefault(str(check.get("table")), set()).update(map(str, keys))
    return found


@dataclass(frozen=True)
class Repair:
    """What `run --repair` re-syncs: the ranges a verification report found different."""

    ranges: dict[str, set[str]]
    report: Path
    generated_at: str
    tables: frozenset[str] = frozenset()  # the tables the report checked (`verify --tables`)


def read_repair(directory: Path, target: str) -> Repair:
    """The ranges to repair from the report last written to `directory`, which must be a
    report on `target` (`DatabaseUrl.identity`, as reports record it)."""
    path = directory / f"{REPORT_BASENAME}.json"
    again = "run `supabase-migrate verify` again"
    missing = (
        f"No verification report at {path} to repair from; run `supabase-migrate verify` "
        "first (or pass --report with the directory it wrote to)."
    )
    text = read_user_text(path, "The verification report", missing)
    try:
        report = json.loads(text)
    except ValueError:
        raise ConfigError(f"The verification report {path} is not JSON; {again}.") from None
    if not isinstance(report, dict):
        raise ConfigError(f"{path} is not a verification report; {again}.")
    if report.get("target_identity") != target:
        raise ConfigError(
            f"The verification report {path} is about another target database "
            f"({report.get('target_identity') or 'unknown'}); {again}."
        )
    checked = frozenset(str(c.get("table")) for c in report.get("checks") or () if c.get("table"))
    return Repair(ranges_to_repair(report), path, str(report.get("generated_at") or "?"), checked)


def finding_dict(finding: Any) -> dict[str, Any]:
    """Security findings arrive from another module in whatever shape; render them as dicts."""
    if dataclasses.is_dataclass(finding) and not isinstance(finding, type):
        data = dataclasses.asdict(finding)
    elif isinstance(finding, Mapping):
        data = dict(finding)
    elif hasattr(finding, "to_dict"):
        data = dict(finding.to_dict())
    else:
        data = {"finding": str(finding)}
    return {
        k: v if isinstance(v, (int, float, bool)) or v is None else str(v) for k, v in data.items()
    }


def finding_fails(finding: Mapping[str, Any]) -> bool:
    return str(finding.get("severity", "")).lower() in FAILING_FINDING_SEVERITIES


@dataclass(frozen=True)
class TableSummary:
    table: str
    source_rows: int | None
    target_rows: int | None
    ranges_verified: int | None
    checksum_status: str  # "match" | "N ranges differ" | "not run" | "error"
    checks_passed: int
    checks_failed: int
    status: str  # PASS | WARN | FAIL


@dataclass(frozen=True)
class Report:
    """Every check outcome of one verification, and what the report shows about them."""

    outcomes: tuple[CheckOutcome, ...]
    security_findings: tuple[Any, ...] = ()
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    run_id: str | None = None
    duration_s: float = 0.0
    seed: int | None = None
    source: str = ""
    target: str = ""
    target_identity: str = ""  # DatabaseUrl.identity: what `run --repair` may trust it for

    # --- verdict ------------------------------------------------------------------------------

    @property
    def findings(self) -> list[dict[str, Any]]:
        return [finding_dict(f) for f in self.security_findings]

    @property
    def error_failures(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.passed and o.severity == ERROR]

    @property
    def warnings(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.passed and o.severity != ERROR]

    @property
    def passed(self) -> bool:
        """PASS unless an ERROR check failed or a security finding is error/critical."""
        return not self.error_failures and not any(finding_fails(f) for f in self.findings)

    def failure_sentence(self, repair: str = "supabase-migrate run --repair") -> str:
        """What failed, in one sentence for a terminal; the report files have the rest.
        `repair`: the command that re-syncs what differs, as the user should type it."""
        findings = sum(1 for f in self.findings if finding_fails(f))
        parts = [f"{len(self.error_failures)} ERROR check(s) failed"] if self.error_failures else []
        parts += (
            [f"{findings} security finding(s) of error or critical severity"] if findings else []
        )
        repair = (
            f"; `{repair}` re-syncs the ranges that differ"
            if any(not o.passed and o.details.get("partitions_to_rerun") for o in self.outcomes)
            else ""
        )
        return f"Verification FAILED: {' and '.join(parts)}{repair}"

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @property
    def tables(self) -> list[str]:
        return list(dict.fromkeys(o.table for o in self.outcomes if o.name not in _NOT_TABLES))

    @property
    def materialized_views(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if o.name == MATVIEW_CONTENT]

    def outcome(self, table: str, name: str) -> CheckOutcome | None:
        return next((o for o in self.outcomes if o.table == table and o.name == name), None)

    def table_summaries(self) -> list[TableSummary]:
        result = []
        for table in self.tables:
            mine = [o for o in self.outcomes if o.table == table]
            counts = self.outcome(table, ROW_COUNT)
            sums = self.outcome(table, CHECKSUMS)
            if sums is None:
                checksum_status = "not run"
            elif "ranges_verified" not in sums.details:
                checksum_status = "error"
            elif sums.passed:
                checksum_status = "match"
            else:
                bad = sums.details.get("mismatched_ranges", 0)
                checksum_status = f"{bad} range differs" if bad == 1 else f"{bad} ranges differ"
            failed = [o for o in mine if not o.passed]
            status = (
                "FAIL"
                if any(o.severity == ERROR for o in failed)
                else ("WARN" if failed else "PASS")
            )
            details = counts.details if counts else {}
            result.append(
                TableSummary(
                    table=table,
                    source_rows=details.get("source_rows"),
                    target_rows=details.get("target_rows"),
                    ranges_verified=sums.details.get("ranges_verified") if sums else None,
                    checksum_status=checksum_status,
                    checks_passed=len(mine) - len(failed),
                    checks_failed=len(failed),
                    status=status,
                )
            )
        return result

    def timings(self) -> dict[str, float]:
        """Seconds spent per check, over all tables (checks overlap nothing: they add up)."""
        totals = dict.fromkeys(CHECK_NAMES, 0.0)
        for o in self.outcomes:
            totals[o.name] = totals.get(o.name, 0.0) + o.duration_s
        return {k: round(v, 3) for k, v in totals.items()}

    def schema_differences(self) -> list[dict[str, str]]:
        rows = []
        for o in self.outcomes:
            if o.name not in (INDEXES, CONSTRAINTS, SCHEMA_OBJECTS):
                continue
            kind = "index" if o.name == INDEXES else "constraint"
            for group, said in _DIFFERENCES.items():
                for item in o.details.get(group, []):
                    rows.append(
                        {
                            "table": "" if o.name == SCHEMA_OBJECTS else o.table,
                            "object": item.get("kind", kind),
                            "name": item["name"],
                            "difference": said,
                        }
                    )
        return rows

    # --- serializations -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "passed": self.passed,
            "generated_at": self.generated_at.isoformat(),
            "run_id": self.run_id,
            "duration_s": round(self.duration_s, 3),
            "sample_seed": self.seed,
            "source": self.source,
            "target": self.target,
            "target_identity": self.target_identity,
            "summary": {
                "tables": len(self.tables),
                "checks": len(self.outcomes),
                "failed_error": len(self.error_failures),
                "failed_warn": len(self.warnings),
                "security_findings": len(self.security_findings),
            },
            "tables": [dataclasses.asdict(s) for s in self.table_summaries()],
            "schema_differences": self.schema_differences(),
            "security_findings": self.findings,
            "timings_s": self.timings(),
            "checks": [o.to_dict() for o in self.outcomes],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def _header_lines(self) -> list[str]:
        return [
            f"Generated {self.generated_at.strftime('%Y-%m-%d %H:%M:%S %Z')}"
            + (f" · run {self.run_id}" if self.run_id else "")
            + f" · {self.duration_s:.1f} s"
            + (f" · sample seed {self.seed}" if self.seed is not None else ""),
            *([f"Source: {self.source} · Target: {self.target}"] if self.source else []),
            f"{len(self.outcomes)} checks on {len(self.tables)} tables"
            + (
                f", {len(self.materialized_views)} materialized views"
                if self.materialized_views
                else ""
            )
            + (
                " and the schemas' views, rules, routines and types"
                if any(o.name == SCHEMA_OBJECTS for o in self.outcomes)
                else ""
            )
            + ": "
            f"{len(self.outcomes) - len(self.error_failures) - len(self.warnings)} passed, "
            f"{len(self.error_failures)} failed (ERROR), {len(self.warnings)} warnings; "
            f"{len(self.security_findings)} security findings.",
        ]

    def _tables(self) -> dict[str, list[dict[str, Any]]]:
        """The report's tables as rows, shared by the Markdown and HTML renderings. Plain
        Python: importing pandas for them cost `verify` 1.4 CPU-seconds."""
        summaries = [
            {
                "table": s.table,
                "source rows": s.source_rows,
                "target rows": s.target_rows,
                "ranges verified": s.ranges_verified,
                "checksums": s.checksum_status,
                "checks passed": s.checks_passed,
                "checks failed": s.checks_failed,
                "status": s.status,
            }
            for s in self.table_summaries()
        ]
        failures = [
            {
                "table": o.table,
                "check": o.name,
                "severity": o.severity,
                "description": o.description,
                "to re-run": ", ".join(o.details.get("partitions_to_rerun", [])[:20]),
            }
            for o in self.error_failures + self.warnings
        ]
        checks = [
            {
                "table": o.table,
                "check": o.name,
                "result": "pass" if o.passed else "FAIL",
                "severity": o.severity,
                "seconds": round(o.duration_s, 3),
                "description": o.description,
            }
            for o in self.outcomes
        ]
        views = [
            {
                "materialized view": o.table,
                "source rows": o.details.get("source_rows"),
                "target rows": o.details.get("target_rows"),
                "status": "PASS" if o.passed else ("FAIL" if o.severity == ERROR else "WARN"),
                "description": o.description,
            }
            for o in self.materialized_views
        ]
        timings = [{"check": k, "seconds": v} for k, v in self.timings().items()]
        return {
            "Tables": summaries,
            **({"Materialized views": views} if views else {}),
            "Failures": failures,
            "Schema differences": self.schema_differences(),
            "Security findings": list(self.findings),
            "Timings": timings,
            "All checks": checks,
        }

    def to_markdown(self) -> str:
        lines = [f"# Migration verification: {self.status}", ""]
        lines += [line + "  " for line in self._header_lines()]
        for title, rows in self._tables().items():
            lines += ["", f"## {title}", ""]
            if not rows:
                lines.append(_nothing(title))
            else:
                headers = _headers(rows)
                lines.append(markdown_table(headers, ([r.get(h) for h in headers] for r in rows)))
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """One self-contained page: inline CSS, no scripts, every value escaped."""
        esc = html.escape
        body = [
            f'<h1>Migration verification: <span class="{self.status.lower()}">'
            f"{self.status}</span></h1>",
            *[f"<p>{esc(line)}</p>" for line in self._header_lines()],
        ]
        for title, rows in self._tables().items():
            body.append(f"<h2>{esc(title)}</h2>")
            body.append(f"<p>{_nothing(title)}</p>" if not rows else _html_table(rows))
        return _HTML_PAGE.format(
            title=esc(f"Migration verification: {self.status}"), body="\n".join(body)
        )

    def write(self, directory: Path | str | None = None) -> dict[str, Path]:
        """Write HTML, JSON and Markdown files (atomically); returns their paths by format."""
        directory = Path(directory) if directory is not None else report_dir()
        try:
            return self._write(directory)
        except OSError as exc:
            raise ConfigError(
                f"The verification report could not be written to {directory} "
                f"({exc.strerror or type(exc).__name__}); give a writable directory "
                f"(--report or {REPORT_DIR_ENV}) and verify again."
            ) from None

    def _write(self, directory: Path) -> dict[str, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        contents = {
            "html": (f"{REPORT_BASENAME}.html", self.to_html()),
            "json": (f"{REPORT_BASENAME}.json", self.to_json()),
            "markdown": (f"{REPORT_BASENAME}.md", self.to_markdown()),
        }
        paths = {}
        # Two commands verifying at once (`verify` beside `run`'s own) each write a whole set:
        # one at a time, each file written under a name of its own, then renamed into place.
        lock = os.open(directory, os.O_RDONLY)  # the directory itself: no file of the lock's
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for fmt, (name, text) in contents.items():
                path = directory / name
                with tempfile.NamedTemporaryFile(
                    "w",
                    encoding="utf-8",
                    dir=directory,
                    prefix=name + ".",
                    suffix=".tmp",
                    delete=False,
                ) as tmp:
                    tmp.write(text)
                os.replace(tmp.name, path)
                paths[fmt] = path
        finally:
            os.close(lock)
        return paths


def _nothing(title: str) -> str:
    return "None reported." if title == "Security findings" else "None."


def _headers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of the rows, in the order they first appear."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _html_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every value escaped; a missing or None value is an empty cell."""
    headers = _headers(rows)

    def cells(tag: str, values: Iterable[object]) -> str:
        return "".join(f"<{tag}>{html.escape('' if v is None else str(v))}</{tag}>" for v in values)

    body = "\n".join(f"<tr>{cells('td', (r.get(h) for h in headers))}</tr>" for r in rows)
    return (
        f"<table>\n<thead><tr>{cells('th', headers)}</tr></thead>\n"
        f"<tbody>\n{body}\n</tbody>\n</table>"
    )


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }}
h1 {{ font-size: 1.6rem; }} h2 {{ font-size: 1.2rem; margin-top: 2rem; }}
.pass {{ color: #1a7f37; }} .fail {{ color: #cf222e; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: left;
          vertical-align: top; }}
th {{ background: #f6f8fa; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
